"""OpenAI-compatible completions and chat: request parsing, the run, response shapes."""
