"""Capture benchmark: the agent against pg_recvlogical on the same WAL."""
