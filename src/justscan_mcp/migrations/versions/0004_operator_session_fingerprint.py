"""operator sessions remember which admin password opened them

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 11:40:00

An operator session records a slow, salted fingerprint (scrypt) of the JUSTSCAN_ADMIN_PASSWORD it
was opened with; when the password is changed or unset, every operator session ends. Sessions
opened before this revision have none and end at once.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dashboard_sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("operator_fingerprint", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dashboard_sessions", schema=None) as batch_op:
        batch_op.drop_column("operator_fingerprint")
