"""The analysis of calls: runs, transcript words, speech segments, metrics (long), turns with their
sentiment, category hits, scores and their items.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
CallId = sa.String(512)


def _call_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["call_id"], ["calls.call_id"], name=f"fk_{table}_call_id_calls", ondelete="CASCADE")


def _rows(table: str, *columns: sa.Column, call: bool = True) -> None:
    """A table with an autoincrementing id (and a call_id referring to calls unless call=False)."""
    parts = [sa.Column("id", RowId, nullable=False, autoincrement=True)]
    if call:
        parts.append(sa.Column("call_id", CallId, nullable=False))
    parts += [*columns, sa.PrimaryKeyConstraint("id", name=f"pk_{table}")]
    if call:
        parts.append(_call_fk(table))
    op.create_table(table, *parts)


def upgrade() -> None:
    _rows("analysis_runs",
          sa.Column("version", sa.Integer, nullable=False),
          sa.Column("analyzed_at", sa.Float, nullable=False),
          sa.Column("seconds", sa.Float, nullable=False),
          sa.Column("transcript_engine", sa.String(64), nullable=False),
          sa.Column("redacted_recording", sa.Text),
          sa.Column("errors", Json, nullable=False),
          sa.Column("result", Json, nullable=False))
    op.create_index("ix_analysis_runs_call_id_id", "analysis_runs", ["call_id", "id"])
    _rows("transcript_words",
          sa.Column("leg", sa.String(16), nullable=False),
          sa.Column("start_ms", sa.Float, nullable=False),
          sa.Column("end_ms", sa.Float, nullable=False),
          sa.Column("text", sa.Text, nullable=False),
          sa.Column("redacted", sa.Boolean, nullable=False))
    op.create_index("ix_transcript_words_call_id_start_ms", "transcript_words", ["call_id", "start_ms"])
    _rows("segments",
          sa.Column("leg", sa.String(16), nullable=False),
          sa.Column("start_ms", sa.Float, nullable=False),
          sa.Column("end_ms", sa.Float, nullable=False))
    op.create_index("ix_segments_call_id_start_ms", "segments", ["call_id", "start_ms"])
    op.create_table(
        "metrics",
        sa.Column("call_id", CallId, nullable=False),
        sa.Column("leg", sa.String(16), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("call_id", "leg", "name", name="pk_metrics"),
        _call_fk("metrics"),
    )
    op.create_index("ix_metrics_name_value", "metrics", ["name", "value"])
    _rows("turns",
          sa.Column("leg", sa.String(16), nullable=False),
          sa.Column("start_ms", sa.Float, nullable=False),
          sa.Column("end_ms", sa.Float, nullable=False),
          sa.Column("text", sa.Text, nullable=False),
          sa.Column("sentiment", sa.Float))
    op.create_index("ix_turns_call_id_start_ms", "turns", ["call_id", "start_ms"])
    _rows("category_hits",
          sa.Column("category", sa.String(128), nullable=False),
          sa.Column("matched", sa.Boolean, nullable=False),
          sa.Column("evidence", Json, nullable=False))
    op.create_index("ix_category_hits_call_id", "category_hits", ["call_id"])
    op.create_index("ix_category_hits_category_matched", "category_hits", ["category", "matched"])
    _rows("scores",
          sa.Column("scorecard", sa.String(128), nullable=False),
          sa.Column("score", sa.Float, nullable=False),
          sa.Column("max_score", sa.Float, nullable=False))
    op.create_index("ix_scores_call_id", "scores", ["call_id"])
    op.create_index("ix_scores_scorecard_score", "scores", ["scorecard", "score"])
    _rows("score_items",
          sa.Column("score_id", RowId, nullable=False),
          sa.Column("rule", sa.String(128), nullable=False),
          sa.Column("weight", sa.Float, nullable=False),
          sa.Column("passed", sa.Boolean, nullable=False),
          sa.ForeignKeyConstraint(["score_id"], ["scores.id"], name="fk_score_items_score_id_scores",
                                  ondelete="CASCADE"),
          call=False)
    op.create_index("ix_score_items_score_id", "score_items", ["score_id"])


def downgrade() -> None:
    for table in ("score_items", "scores", "category_hits", "turns", "metrics", "segments", "transcript_words",
                  "analysis_runs"):
        op.drop_table(table)
