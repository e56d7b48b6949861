"""Record ids namespaced by sender: ``audit.record_id`` is unique per sending token.

Before this revision a record id was unique across the whole chain, so a pipeline
that posted another pipeline's predictable id first made the real record a
conflict (issue 9.2). Now the unique index is on (``sender``, ``record_id``). The
coordinator's own records (no sender) carry random ids. The table is spelled out
here (not taken from the service's module) so that this revision never changes:
SQLite cannot drop the first revision's unnamed unique constraint in place, so
the table is recreated from this definition (Alembic's batch mode) with its data.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_INDEXES = {
    "ix_audit_run": ["run_id"],
    "ix_audit_label_time": ["label", "time"],
    "ix_audit_event_time": ["event", "time"],
    "ix_audit_time": ["time"],
    "ix_audit_received_at": ["received_at"],
}


def _audit_after() -> sa.Table:
    """The audit table as this revision leaves it, without the old unique constraint."""
    meta = sa.MetaData()
    return sa.Table(
        "audit",
        meta,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("run_id", sa.String(128)),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("label", sa.String(128)),
        sa.Column("time", sa.String(32), nullable=False),
        sa.Column("received_at", sa.String(32), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("sender", sa.String(32)),
        *(sa.Index(name, *cols) for name, cols in _INDEXES.items()),
    )


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table("audit", recreate="always", copy_from=_audit_after()):
            pass
    else:
        for uc in sa.inspect(bind).get_unique_constraints("audit"):
            if uc["column_names"] == ["record_id"] and uc["name"]:
                op.drop_constraint(uc["name"], "audit", type_="unique")
    op.create_index("uq_audit_sender_record", "audit", ["sender", "record_id"], unique=True)


def downgrade() -> None:
    raise NotImplementedError("the coordinator's migrations go forward only")
