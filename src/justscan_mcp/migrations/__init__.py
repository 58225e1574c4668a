"""Alembic revisions of the justscan-mcp schema.

`HEAD` names the newest revision so that a start can see "the schema is current" with one query
instead of loading Alembic (tests/test_migrations.py keeps it equal to Alembic's own head).
"""

HEAD = "0016"
