"""The first-wave schema: settings, tokens, policies, secrets, the audit chain and runs.

Databases made before migrations existed hold exactly this schema without an
``alembic_version`` table; :func:`cape_coordinator.migrate.upgrade` stamps them
with this revision and goes on from here. The tables are spelled out (not taken
from :mod:`cape_coordinator.db`) so that this revision never changes.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.String(32)),
        sa.Column("revoked_at", sa.String(32)),
    )
    op.create_table(
        "policies",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("author", sa.String(128), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("submitted_at", sa.String(32)),
        sa.Column("reviewed_by", sa.String(128)),
        sa.Column("reviewed_at", sa.String(32)),
        sa.Column("reason", sa.Text),
        sa.Column("activated_at", sa.String(32)),
        sa.Column("signature", sa.String(128)),
        sa.UniqueConstraint("label", "version", name="uq_policy_label_version"),
    )
    op.create_index("ix_policy_label_state", "policies", ["label", "state"])
    op.create_table(
        "secrets",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_secret_name_version"),
    )
    op.create_table(
        "secret_labels",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("label", sa.String(128), primary_key=True),
    )
    op.create_table(
        "audit",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("record_id", sa.String(128), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("run_id", sa.String(128)),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("label", sa.String(128)),
        sa.Column("time", sa.String(32), nullable=False),
        sa.Column("received_at", sa.String(32), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_run", "audit", ["run_id"])
    op.create_index("ix_audit_label_time", "audit", ["label", "time"])
    op.create_index("ix_audit_event_time", "audit", ["event", "time"])
    op.create_index("ix_audit_time", "audit", ["time"])
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(128), primary_key=True),
        sa.Column("engine", sa.String(64)),
        sa.Column("engine_version", sa.String(64)),
        sa.Column("label", sa.String(128)),
        sa.Column("version", sa.Integer),
        sa.Column("principal", sa.String(128)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.String(32)),
        sa.Column("ended_at", sa.String(32)),
        sa.Column("last_seen", sa.String(32), nullable=False),
        sa.Column("rows_in", sa.Integer),
        sa.Column("rows_out", sa.Integer),
        sa.Column("rows_redacted", sa.Integer),
        sa.Column("error_type", sa.String(128)),
        sa.Column("records", sa.Integer, nullable=False),
    )
    op.create_index("ix_runs_last_seen", "runs", ["last_seen"])


def downgrade() -> None:
    raise NotImplementedError("the coordinator's migrations go forward only")
