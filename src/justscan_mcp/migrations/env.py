"""Alembic environment: always run on a connection handed over by `justscan_mcp.store`.

The store opens the transaction and takes a lock first (PostgreSQL: an advisory lock; SQLite:
BEGIN IMMEDIATE), so processes that start together migrate one after the other.
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import justscan_mcp.models  # noqa: F401 - registers the tables on SQLModel.metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
