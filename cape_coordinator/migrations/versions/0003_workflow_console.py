"""The request -> review workflow and the web console: policy requests, review settings per
label, reviewer assignments, approvals, comment threads, and console sessions.

The tables are spelled out (not taken from the services' modules) so that this revision
never changes.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policy_requests",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("dataset", sa.String(128), nullable=False),
        sa.Column("schema", sa.Text, nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("columns", sa.Text, nullable=False),
        sa.Column("requester", sa.String(128), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("label", sa.String(128)),
        sa.Column("version", sa.Integer),
        sa.Column("linked_by", sa.String(128)),
        sa.Column("declined_by", sa.String(128)),
        sa.Column("declined_at", sa.String(32)),
        sa.Column("decline_reason", sa.Text),
    )
    op.create_index("ix_requests_label", "policy_requests", ["label"])
    op.create_table(
        "review_settings",
        sa.Column("label", sa.String(128), primary_key=True),
        sa.Column("required_approvals", sa.Integer, nullable=False),
        sa.Column("reviewers", sa.Text, nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "review_assignments",
        sa.Column("label", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("reviewer", sa.String(128), primary_key=True),
        sa.Column("assigned_by", sa.String(128), nullable=False),
        sa.Column("assigned_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "review_approvals",
        sa.Column("label", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("reviewer", sa.String(128), primary_key=True),
        sa.Column("approved_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "review_comments",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("author", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("rule", sa.Integer),
        sa.Column("reply_to", sa.Integer),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_index("ix_comments_label_version", "review_comments", ["label", "version"])
    op.create_table(
        "console_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("token_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("last_seen", sa.String(32), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("flash", sa.Text),
    )
    op.create_index("ix_console_sessions_token_id", "console_sessions", ["token_id"])


def downgrade() -> None:
    op.drop_table("console_sessions")
    op.drop_table("review_comments")
    op.drop_table("review_approvals")
    op.drop_table("review_assignments")
    op.drop_table("review_settings")
    op.drop_table("policy_requests")
