"""loramux_engine: a continuous-batching multi-LoRA engine for LLaMA-family models.

The engine knows nothing of tenants, HTTP, SQL or object storage.
"""
