"""loramux: many tenants' LoRA adapters over one shared base model."""

__version__ = "0.1.0"
