"""The SQL registry: typed SQLAlchemy models, sessions, and the tenant-scoped query helper."""
