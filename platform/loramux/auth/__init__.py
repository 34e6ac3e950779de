"""API keys, scopes and the Starlette authentication backend."""
