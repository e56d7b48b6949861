"""The governance catalog: datasets with their schema, tags on columns (who and when), the
operator's taxonomy additions, the scanner's proposals, and per-label coverage settings.

The tables are spelled out (not taken from the service's module) so that this revision
never changes.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_datasets",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("schema", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "catalog_column_tags",
        sa.Column("dataset", sa.String(128), primary_key=True),
        sa.Column("column", sa.String(128), primary_key=True),
        sa.Column("tag", sa.String(128), primary_key=True),
        sa.Column("tagged_by", sa.String(128), nullable=False),
        sa.Column("tagged_at", sa.String(32), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
    )
    op.create_table(
        "catalog_taxonomy",
        sa.Column("tag", sa.String(128), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "catalog_proposals",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dataset", sa.String(128), nullable=False),
        sa.Column("column", sa.String(128), nullable=False),
        sa.Column("tag", sa.String(128), nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("evidence", sa.Integer, nullable=False),
        sa.Column("sampled", sa.Integer, nullable=False),
        sa.Column("detector", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("proposed_by", sa.String(128), nullable=False),
        sa.Column("proposed_at", sa.String(32), nullable=False),
        sa.Column("decided_by", sa.String(128)),
        sa.Column("decided_at", sa.String(32)),
        sa.Column("reason", sa.Text),
    )
    op.create_index("ix_catalog_proposals_dataset_state", "catalog_proposals", ["dataset", "state"])
    op.create_table(
        "catalog_label_settings",
        sa.Column("label", sa.String(128), primary_key=True),
        sa.Column("dataset", sa.String(128), nullable=False),
        sa.Column("require_coverage", sa.Boolean, nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("the coordinator's migrations go forward only")
