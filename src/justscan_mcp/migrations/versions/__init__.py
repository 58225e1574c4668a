"""Alembic revisions, one file each, frozen in time: they import nothing from justscan_mcp."""
