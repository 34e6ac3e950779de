"""The CLI's client of the tenant API: ``LORAMUX_BASE_URL`` with ``LORAMUX_API_KEY``.

Every failure becomes one ``CommandFailed`` line naming the URL that failed: a server that
cannot be reached, an error in OpenAI's shape (its message), or an answer that is not
loramux's at all (another server, or a base URL with a path the API does not have).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx

from loramux.commands.output import CommandFailed
from loramux.settings import get_settings

ROOT_HINT = "LORAMUX_BASE_URL is the server's address, e.g. http://127.0.0.1:8000"
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
STDOUT = "-"


def api_root(base_url: str) -> str:
    """The server's root. A trailing ``/`` or ``/v1`` (how the OpenAI SDK's base_url is
    written) is dropped: every path the CLI sends starts with ``/v1`` itself."""
    root = base_url.strip().rstrip("/")
    if root.endswith("/v1"):
        root = root.removesuffix("/v1").rstrip("/")
    parts = urlsplit(root)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CommandFailed(f"LORAMUX_BASE_URL {base_url!r} is not an http(s) URL; {ROOT_HINT}")
    return root


class ApiFailure(CommandFailed):
    """The API answered with an error status; ``code`` is its OpenAI error code, if any."""

    def __init__(self, message: str, status: int, code: str | None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _reason(error: httpx.HTTPError) -> str:
    return str(error).strip() or type(error).__name__


def _error_body(response: httpx.Response) -> dict[str, Any] | None:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error if isinstance(error, dict) and "message" in error else None


def _failure(request: httpx.Request, response: httpx.Response) -> ApiFailure:
    where = f"{request.method} {request.url} answered {response.status_code}"
    error = _error_body(response)
    if error is None:
        # Not loramux's error shape: another server, a proxy, or a path outside the API.
        hint = f", not loramux's API; {ROOT_HINT}" if response.status_code in (404, 405) else ""
        return ApiFailure(f"{where} {response.reason_phrase}{hint}", response.status_code, None)
    hint = "; check LORAMUX_API_KEY" if response.status_code == 401 else ""
    code = error.get("code")
    return ApiFailure(
        f"{where}: {error['message']}{hint}",
        response.status_code,
        code if isinstance(code, str) else None,
    )


class ApiClient:
    """Requests to one loramux server with one tenant key."""

    def __init__(self, root: str, api_key: str, timeout: httpx.Timeout = TIMEOUT) -> None:
        self.root = root
        self._http = httpx.Client(
            base_url=root, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )

    @classmethod
    def from_settings(cls, timeout: httpx.Timeout = TIMEOUT) -> ApiClient:
        settings = get_settings()
        if settings.api_key is None:
            raise CommandFailed(
                "set LORAMUX_API_KEY to a tenant API key (`loramux keys create --tenant NAME` "
                "makes one)"
            )
        return cls(api_root(settings.base_url), settings.api_key.get_secret_value(), timeout)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._http.close()

    def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        try:
            response = self._http.send(request, stream=stream)
        except httpx.ConnectError as error:
            raise CommandFailed(
                f"cannot reach {request.url}: {_reason(error)}; is the server running there? "
                "(LORAMUX_BASE_URL)"
            ) from None
        except httpx.HTTPError as error:
            raise CommandFailed(f"cannot reach {request.url}: {_reason(error)}") from None
        if response.status_code >= 400:
            try:
                response.read()
            except httpx.HTTPError:
                pass  # the status alone still says what went wrong
            finally:
                response.close()
            raise _failure(request, response)
        return response

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """The JSON object ``method path`` answers; CommandFailed on any failure."""
        request = self._http.build_request(method, path, **kwargs)
        response = self._send(request)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise CommandFailed(
                f"{method} {request.url} answered {response.status_code} without a JSON "
                f"object; {ROOT_HINT}"
            )
        return body

    def download(self, path: str, dest: str) -> int:
        """Stream ``GET path`` into the file ``dest`` (``-``: stdout); returns the bytes.

        A file is written beside ``dest`` first and renamed when complete, so a broken
        download never leaves a truncated file under the name asked for."""
        request = self._http.build_request("GET", path)
        response = self._send(request, stream=True)
        partial = Path(dest + ".part")
        written = 0
        try:
            if dest == STDOUT:
                for chunk in response.iter_bytes():
                    sys.stdout.buffer.write(chunk)
                    written += len(chunk)
                sys.stdout.buffer.flush()
                return written
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    written += len(chunk)
            partial.replace(dest)
        except httpx.HTTPError as error:
            partial.unlink(missing_ok=True)
            raise CommandFailed(f"cannot download {request.url}: {_reason(error)}") from None
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise CommandFailed(f"cannot write {dest}: {error.strerror or error}") from None
        finally:
            response.close()
        return written
