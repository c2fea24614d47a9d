"""CLI sub-commands other than ``db`` (which lives with the retrieval code)."""
