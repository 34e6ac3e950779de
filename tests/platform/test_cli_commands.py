"""The CLI a new user meets: help, version, base URLs, one error style, list commands.

Tenant commands run as the ``loramux`` executable against the app served over real HTTP;
registry commands against a fresh embedded home.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from loramux.app import build_state, create_app
from loramux.auth.keys import SCOPES
from loramux.cli import build_parser, main
from loramux.commands.client import api_root
from loramux.commands.output import CommandFailed, Progress
from loramux.db.models import Adapter, Tenant
from loramux.names import NAME_MAX
from loramux.settings import Settings, get_settings
from tests.platform.cli_runner import assert_fails_in_one_line, loramux, tenant_env
from tests.platform.live_server import serve

MakeTenant = Callable[..., tuple[dict[str, Any], str]]


@pytest.fixture
def live_url(settings: Settings) -> Iterator[str]:
    with serve(create_app(settings, app_state=build_state(settings))) as url:
        yield url


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_command_and_option_has_help() -> None:
    missing = []
    for prog, parser in _parsers(build_parser()):
        assert parser.description, f"{prog} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                listed = action._choices_actions  # what `--help` shows for each command
                missing += [f"{prog} {a.dest}" for a in listed if not a.help]
            elif not action.help:
                missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_version_is_the_installed_distributions() -> None:
    result = loramux(["--version"], dict(os.environ))
    assert result.returncode == 0 and result.stdout.strip() == f"loramux {version('loramux')}"


def test_keys_create_help_lists_the_scopes_a_tenant_key_may_hold() -> None:
    shown = " ".join(loramux(["keys", "create", "--help"], dict(os.environ)).stdout.split())
    for scope in SCOPES - {"admin"}:
        assert scope in shown
    assert "admin" not in shown


def test_the_cli_name_rule_fits_the_registry_columns() -> None:
    assert Tenant.__table__.c.name.type.length == NAME_MAX
    assert Adapter.__table__.c.name.type.length == NAME_MAX


@pytest.mark.parametrize(
    "base_url",
    [
        "http://h:8000",
        "http://h:8000/",
        "http://h:8000/v1",
        "http://h:8000/v1/",
        " http://h:8000//",
    ],
)
def test_api_root_drops_a_trailing_slash_or_v1(base_url: str) -> None:
    assert api_root(base_url) == "http://h:8000"


def test_api_root_keeps_a_proxy_prefix_and_refuses_what_is_not_http() -> None:
    assert api_root("https://proxy/loramux/v1") == "https://proxy/loramux"
    for bad in ("127.0.0.1:8000", "ftp://h", "http://", ""):
        with pytest.raises(CommandFailed, match="is not an http"):
            api_root(bad)


def test_a_base_url_ending_in_v1_or_a_slash_works(live_url: str, make_tenant: MakeTenant) -> None:
    _, key = make_tenant("acme")
    for suffix, command in (("", "adapters"), ("/", "batches"), ("/v1", "adapters"),
                            ("/v1/", "batches")):  # fmt: skip
        result = loramux([command, "list", "--json"], tenant_env(live_url + suffix, key))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["data"] == []


def test_every_failure_is_one_line_naming_the_url(live_url: str, make_tenant: MakeTenant) -> None:
    _, key = make_tenant("acme", scopes=["inference"])
    bad_key = loramux(["adapters", "list"], tenant_env(live_url, "lmx_not-a-real-key-0000000000"))
    assert_fails_in_one_line(bad_key, f"GET {live_url}/v1/adapters answered 401", "LORAMUX_API_KEY")
    no_scope = loramux(["batches", "list"], tenant_env(live_url, key))
    assert_fails_in_one_line(no_scope, f"GET {live_url}/v1/batches?limit=20 answered 403")
    not_the_api = loramux(["adapters", "list"], tenant_env(f"{live_url}/api", key))
    assert_fails_in_one_line(
        not_the_api, f"{live_url}/api/v1/adapters answered 404 Not Found, not loramux's API"
    )
    refused = loramux(["batches", "get", "batch_x"], tenant_env("http://127.0.0.1:1", key))
    assert_fails_in_one_line(refused, "cannot reach http://127.0.0.1:1/v1/batches/batch_x")
    no_scheme = loramux(["adapters", "list"], tenant_env("127.0.0.1:8000", key))
    assert_fails_in_one_line(no_scheme, "LORAMUX_BASE_URL '127.0.0.1:8000' is not an http(s) URL")
    env = tenant_env(live_url, key)
    del env["LORAMUX_API_KEY"]
    assert_fails_in_one_line(loramux(["adapters", "list"], env), "set LORAMUX_API_KEY")


@pytest.fixture
def cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """``cli(*args)``: ``loramux.cli.main`` in this process on a fresh embedded home (the
    registry commands import SQLAlchemy, seconds per process on a busy machine)."""
    for name in [k for k in os.environ if k.startswith("LORAMUX_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LORAMUX_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    yield run
    get_settings.cache_clear()


def test_registry_lists_as_tables_and_json(cli: Callable[..., Any]) -> None:
    assert cli("tenants", "list").stdout.strip() == "no tenants yet"
    for name in ("zeta", "acme"):
        assert cli("tenants", "create", name).returncode == 0
    made = json.loads(cli("keys", "create", "--tenant", "acme", "--json").stdout)
    other = json.loads(cli("keys", "create", "--tenant", "zeta", "--json").stdout)
    assert cli("keys", "revoke", other["id"]).returncode == 0

    table = cli("tenants", "list").stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "STATUS", "CREATED", "(UTC)"]
    assert [line.split()[1] for line in table[1:]] == ["acme", "zeta"]
    tenants = json.loads(cli("tenants", "list", "--json").stdout)
    assert tenants["object"] == "list" and [t["name"] for t in tenants["data"]] == ["acme", "zeta"]

    keys = cli("keys", "list").stdout
    assert made["key"] not in keys  # the secret was shown once, at create
    rows = {line.split()[0]: line.split() for line in keys.splitlines()[1:]}
    scopes = "adapters:read,adapters:write,batches,inference"
    assert rows[made["id"]][3:6] == ["acme", scopes, "active"]
    assert rows[other["id"]][3] == "zeta" and rows[other["id"]][5] == "revoked"
    only_acme = json.loads(cli("keys", "list", "--tenant", "acme", "--json").stdout)
    assert only_acme["object"] == "list"
    assert [(k["id"], k["tenant"]) for k in only_acme["data"]] == [(made["id"], "acme")]
    assert_fails_in_one_line(cli("keys", "list", "--tenant", "nope"), "no tenant 'nope'")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere() -> None:
    terminal, log = Terminal(), io.StringIO()
    for out in (terminal, log):
        progress = Progress("job", out, width=10)
        for done in range(0, 101, 5):
            progress.update(done, 100, f"{done}/100", "in_progress" if done < 100 else "done")
        progress.finish()
    assert terminal.getvalue().count("\r") == 21
    assert "\rjob [##########] 100% 100/100 done" in terminal.getvalue()
    assert terminal.getvalue().endswith("\n")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "[" not in log.getvalue()
    assert lines[0] == "job: 0% 0/100 in_progress" and lines[-1] == "job: 100% 100/100 done"
    assert len(lines) == 11  # each tenth of the way, and the change of state at the end
