"""the audit log of confirmations asked before destructive MCP tool calls

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-29 18:35:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "tool_confirmations",
        sa.Column("id", ID, nullable=False),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("key_id", ID, nullable=False),
        sa.Column("tool", sa.String(length=64), nullable=False),
        sa.Column("webhook_id", ID, nullable=True),
        sa.Column("question", sa.String(length=1000), nullable=False),
        sa.Column("answer", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("tool_confirmations")
