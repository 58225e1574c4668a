"""webhooks remember a failure streak and why they were switched off

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 16:50:00

`failing_since` is when the current failure streak began; `disabled_reason` is "failing" when the
service switched the webhook off after JUSTSCAN_DISABLE_AFTER.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("disabled_reason", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.drop_column("failing_since")
        batch_op.drop_column("disabled_reason")
