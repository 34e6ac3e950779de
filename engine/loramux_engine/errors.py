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
