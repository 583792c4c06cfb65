"""The state store: the only code that knows SQLite."""
