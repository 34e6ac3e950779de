"""Why an adapter is refused, written for the tenant who uploaded it."""

from __future__ import annotations


class AdapterRejected(ValueError):
    """The adapter's files are unsafe or unusable; the message is the human-readable reason.

    At upload it becomes a 400; in the validation task it becomes the version's ``reason``.
    """
