"""The shutdown grace period, as requests in flight see it.

On SIGTERM the server stops accepting connections and lets the requests in flight
finish, for ``shutdown_grace_s`` at most. When that runs out, each generation still
running ends itself: a stream with an in-band error event and its usage billed for what
the client received, a plain request with a 503; a batch line is retried by its batch
elsewhere. Only then, a few seconds later, does the server cancel what is left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from loramux.errors import ServiceUnavailable

log = logging.getLogger(__name__)


class ShuttingDown(ServiceUnavailable):
    code = "server_shutting_down"

    def __init__(self) -> None:
        super().__init__(
            "The server is shutting down and ended this request early; retry it.",
            code=self.code,
        )


class Drain:
    """Callbacks run once, when the grace has run out; late subscribers run at once."""

    def __init__(self) -> None:
        self.expired = False
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next = 0

    def on_expiry(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` when the grace runs out; returns the unsubscribe function."""
        if self.expired:
            callback()
            return lambda: None
        token, self._next = self._next, self._next + 1
        self._callbacks[token] = callback

        def unsubscribe() -> None:
            self._callbacks.pop(token, None)

        return unsubscribe

    def expire(self) -> None:
        """Called on the event loop once the grace has run out."""
        self.expired = True
        callbacks, self._callbacks = list(self._callbacks.values()), {}
        if callbacks:
            log.warning("shutdown grace ran out: ending %d request(s) in flight", len(callbacks))
        for callback in callbacks:
            callback()
