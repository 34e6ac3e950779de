"""One error type per way a request or a configuration can be refused."""

from __future__ import annotations


class EngineConfigError(ValueError):
    """The engine cannot be built with these settings."""


class InvalidSamplingParamsError(ValueError):
    """A sampling parameter is out of range or inconsistent."""


class PromptTooLongError(ValueError):
    """The prompt (plus the tokens it asks for) does not fit the model's context."""

    def __init__(self, num_prompt_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"prompt has {num_prompt_tokens} tokens; the model's context is "
            f"{max_model_len} tokens and at least one token must be generated"
        )
        self.num_prompt_tokens = num_prompt_tokens
        self.max_model_len = max_model_len


class ModelLoadError(ValueError):
    """The model directory is not a LLaMA-family checkpoint this engine can load."""


class AdapterRequestError(ValueError):
    """A request names an adapter this engine cannot serve (no adapter source configured)."""


class SequenceFailedError(RuntimeError):
    """One sequence failed in a step that went on for every other sequence.

    It finishes with reason "error"; the rest of its batch gets the tokens it would
    have got without it.
    """

    @classmethod
    def caused_by(cls, cause: Exception, failed_to: str) -> SequenceFailedError:
        """The error for a request whose own work raised ``cause`` (kept as its __cause__)."""
        error = cls(f"the engine failed to {failed_to} ({type(cause).__name__})")
        error.__cause__ = cause
        return error


class NonFiniteLogitsError(SequenceFailedError):
    """The sequence's logits held NaN or infinities (e.g. its adapter's weights overflowed)."""
