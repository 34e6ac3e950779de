"""Why an adapter cannot be served; messages are written for the tenant who uploaded it."""

from __future__ import annotations


class UnsupportedAdapterError(ValueError):
    """The adapter's config or weights are not something this engine can apply."""


class AdapterIntegrityError(ValueError):
    """The adapter's bytes do not hash to the sha256 it was referenced by."""


class AdapterLoadError(RuntimeError):
    """Loading an adapter failed; the requests that need it must fail with this message."""

    def __init__(self, adapter_id: str, cause: BaseException) -> None:
        super().__init__(f"adapter {adapter_id} could not be loaded: {cause}")
        self.adapter_id = adapter_id
        self.__cause__ = cause
