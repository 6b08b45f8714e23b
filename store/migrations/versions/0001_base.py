"""The base schema: tenants, calls, their legs, events and flow transitions.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# written out here, not imported from store/schema.py: a revision stays what it was when schema.py moves on
Json = sa.JSON().with_variant(JSONB(), "postgresql")
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
CallId = sa.String(512)


def _call_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["call_id"], ["calls.call_id"], name=f"fk_{table}_call_id_calls", ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_tenants"),
    )
    op.create_table(
        "calls",
        sa.Column("call_id", CallId, nullable=False),
        sa.Column("direction", sa.String(16)),
        sa.Column("tenant", sa.String(64)),
        sa.Column("bot", sa.String(128)),
        sa.Column("route", sa.String(128)),
        sa.Column("account", sa.String(128)),
        sa.Column("caller", sa.Text),
        sa.Column("called", sa.Text),
        sa.Column("local_uri", sa.Text),
        sa.Column("remote_uri", sa.Text),
        sa.Column("start_at", sa.Float),
        sa.Column("answered_at", sa.Float),
        sa.Column("end_at", sa.Float),
        sa.Column("duration_s", sa.Float),
        sa.Column("codec", sa.String(32)),
        sa.Column("clock_rate", sa.Integer),
        sa.Column("hangup_cause", sa.String(32)),
        sa.Column("hangup_code", sa.Integer),
        sa.Column("hangup_reason", sa.Text),
        sa.Column("transfer_target", sa.Text),
        sa.Column("transfer_succeeded", sa.Boolean),
        sa.Column("flow_name", sa.String(128)),
        sa.Column("flow_state", sa.String(128)),
        sa.Column("flow_reason", sa.String(64)),
        sa.Column("outcome", sa.String(32)),
        sa.Column("complete", sa.Boolean, nullable=False),
        sa.Column("recording_path", sa.Text),
        sa.Column("recording_seconds", sa.Float),
        sa.Column("events_path", sa.Text),
        sa.Column("record", Json),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("call_id", name="pk_calls"),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name="fk_calls_tenant_tenants"),
    )
    for column in ("start_at", "bot", "tenant", "outcome"):
        op.create_index(f"ix_calls_{column}", "calls", [column])
    op.create_table(
        "legs",
        sa.Column("id", RowId, nullable=False, autoincrement=True),
        sa.Column("call_id", CallId, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("leg_call_id", CallId),
        sa.Column("target", sa.Text),
        sa.Column("started_at", sa.Float),
        sa.Column("ended_at", sa.Float),
        sa.Column("succeeded", sa.Boolean),
        sa.Column("code", sa.Integer),
        sa.Column("reason", sa.Text),
        sa.Column("detail", Json),
        sa.PrimaryKeyConstraint("id", name="pk_legs"),
        _call_fk("legs"),
    )
    op.create_index("ix_legs_call_id", "legs", ["call_id"])
    op.create_table(
        "events",
        sa.Column("id", RowId, nullable=False, autoincrement=True),
        sa.Column("call_id", CallId, nullable=False),
        sa.Column("t", sa.Float),
        sa.Column("t_ms", sa.Float),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("data", Json, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        _call_fk("events"),
    )
    op.create_index("ix_events_call_id_id", "events", ["call_id", "id"])
    op.create_table(
        "flow_transitions",
        sa.Column("id", RowId, nullable=False, autoincrement=True),
        sa.Column("call_id", CallId, nullable=False),
        sa.Column("t", sa.Float),
        sa.Column("t_ms", sa.Float),
        sa.Column("flow", sa.String(128), nullable=False),
        sa.Column("from_state", sa.String(128), nullable=False),
        sa.Column("to_state", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_flow_transitions"),
        _call_fk("flow_transitions"),
    )
    op.create_index("ix_flow_transitions_call_id_id", "flow_transitions", ["call_id", "id"])


def downgrade() -> None:
    for table in ("flow_transitions", "events", "legs", "calls", "tenants"):
        op.drop_table(table)
