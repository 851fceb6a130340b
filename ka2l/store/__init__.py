"""Durable state: SQLite (schema only in ``migrations``) and memory-mapped arrays under data/."""
