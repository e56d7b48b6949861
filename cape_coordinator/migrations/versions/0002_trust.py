"""Trust round: who sent each run record, runs bound to their sender, receipt times.

``audit.sender`` is the token id that posted a run record (null for the
coordinator's own records and for records stored before this revision);
``runs.sender`` binds a run to the token of its first record. The runs view
now shows the coordinator's receipt times; the client's own times are kept in
``runs.client_started_at``/``client_ended_at`` (copied from the old columns,
which held client times before this revision). ``since``/``until`` filter on
``audit.received_at``, hence its index.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit") as batch:
        batch.add_column(sa.Column("sender", sa.String(32)))
    op.create_index("ix_audit_received_at", "audit", ["received_at"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("sender", sa.String(32)))
        batch.add_column(sa.Column("client_started_at", sa.String(32)))
        batch.add_column(sa.Column("client_ended_at", sa.String(32)))
    op.execute("UPDATE runs SET client_started_at = started_at, client_ended_at = ended_at")


def downgrade() -> None:
    raise NotImplementedError("the coordinator's migrations go forward only")
