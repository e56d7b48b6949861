"""Orchestrator links: the applications the pollers see, what each run claims, and the links.

``orchestrator_apps`` holds one row per application (a Spark app, a YARN app, an
Airflow task instance) per configured endpoint, as last polled.
``run_claims`` holds what a run's ``run.started`` said about its orchestrator
(written when the record is stored, bound to the run's sender and label), and
``run_links`` which application of which endpoint each run was matched to. The
tables are spelled out (not taken from the service's module) so that this
revision never changes.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orchestrator_apps",
        sa.Column("endpoint", sa.String(128), primary_key=True),
        sa.Column("app_id", sa.String(256), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("cluster", sa.String(256)),
        sa.Column("name", sa.String(256)),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("ended", sa.Boolean, nullable=False),
        sa.Column("final_status", sa.String(32)),
        sa.Column("user", sa.String(128)),
        sa.Column("started_at", sa.String(32)),
        sa.Column("ended_at", sa.String(32)),
        sa.Column("duration_ms", sa.BigInteger),
        sa.Column("executors", sa.Integer),
        sa.Column("cores", sa.Integer),
        sa.Column("try_number", sa.Integer),
        sa.Column("first_seen", sa.String(32), nullable=False),
        sa.Column("last_seen", sa.String(32), nullable=False),
        sa.Column("ended_seen", sa.String(32)),
    )
    op.create_table(
        "run_claims",
        sa.Column("run_id", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("app_id", sa.String(256), nullable=False),
        sa.Column("cluster", sa.String(256)),
        sa.Column("try_number", sa.Integer),
        sa.Column("label", sa.String(128)),
        sa.Column("sender", sa.String(32)),
        sa.Index("ix_run_claims_app", "kind", "app_id"),
    )
    op.create_table(
        "run_links",
        sa.Column("run_id", sa.String(128), primary_key=True),
        sa.Column("endpoint", sa.String(128), primary_key=True),
        sa.Column("app_id", sa.String(256), nullable=False),
        sa.Column("linked_at", sa.String(32), nullable=False),
        sa.Index("ix_run_links_app", "endpoint", "app_id"),
    )


def downgrade() -> None:
    raise NotImplementedError("the coordinator's migrations go forward only")
