"""Outbound campaigns: every attempt of a campaign (`callbot campaign run`), its row, disposition and
answering-machine verdict, beside the calls (an answered attempt's call is in `calls` under its call_id;
an unanswered one may have no call row, hence no foreign key).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
CallId = sa.String(512)


def upgrade() -> None:
    op.create_table(
        "campaign_attempts",
        sa.Column("id", RowId, nullable=False, autoincrement=True),
        sa.Column("campaign", sa.String(256), nullable=False),
        sa.Column("row", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("call_id", CallId),
        sa.Column("disposition", sa.String(32), nullable=False),
        sa.Column("sip_code", sa.Integer),
        sa.Column("reason", sa.Text),
        sa.Column("amd", sa.String(32)),
        sa.Column("amd_ms", sa.Float),
        sa.Column("beep_ms", sa.Float),
        sa.Column("started_at", sa.Float),
        sa.Column("answered_at", sa.Float),
        sa.Column("ended_at", sa.Float),
        sa.Column("variables", Json, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_campaign_attempts"),
    )
    op.create_index("ix_campaign_attempts_campaign_row", "campaign_attempts", ["campaign", "row"])
    op.create_index("ix_campaign_attempts_call_id", "campaign_attempts", ["call_id"])
    op.create_index("ix_campaign_attempts_disposition", "campaign_attempts", ["disposition"])


def downgrade() -> None:
    op.drop_table("campaign_attempts")
