"""Telling satellites about changes: the in-process hub and Postgres NOTIFY between instances."""
