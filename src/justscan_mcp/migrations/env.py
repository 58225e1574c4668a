"""Alembic environment: always run on a connection handed over by `justscan_mcp.store`.

The store opens the transaction and takes a lock first (PostgreSQL: an advisory lock; SQLite:
BEGIN IMMEDIATE), so processes that start together migrate one after the other.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from sqlmodel import SQLModel

from justscan_mcp.models import UTCDateTime  # importing models registers the tables on the metadata


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Revisions are frozen in time: they must not import live model code (a renamed or changed
    type would break every old revision), so our column types are written as plain SQLAlchemy."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,
    compare_type=True,
    render_item=render_item,
    # `justscan-mcp db upgrade` shows progress per revision (a backfill can take minutes).
    on_version_apply=context.config.attributes.get("on_version_apply"),
)
with context.begin_transaction():
    context.run_migrations()
