"""Audit delivery: one cursor per configured audit sink.

``position`` is the chain ``seq`` of the last record the sink acknowledged (records
after it are the sink's backlog); ``lease_owner``/``lease_until`` let one replica at
a time deliver for a sink when several coordinators share a database; the counters
and ``last_error`` feed monitoring. The table is spelled out (not taken from the
service's module) so that this revision never changes.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_delivery",
        sa.Column("sink", sa.String(64), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("delivered", sa.Integer, nullable=False),
        sa.Column("dead_lettered", sa.Integer, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("last_delivered_at", sa.String(32)),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_until", sa.String(32)),
        sa.Column("created_at", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("the coordinator's migrations go forward only")
