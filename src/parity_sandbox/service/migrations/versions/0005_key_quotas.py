"""Per-key caps (limits, runtimes, images) and a daily CPU-seconds budget; tasks record the
CPU seconds they used.

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


def upgrade() -> None:
    with op.batch_alter_table("keys") as batch:
        batch.add_column(sa.Column("caps", sa.Text, nullable=True))
        batch.add_column(sa.Column("cpu_seconds_per_day", sa.Float, nullable=True))
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("cpu_seconds", sa.Float, nullable=True))
    op.create_index("ix_tasks_key_ended", "tasks", ["key_id", "ended_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_key_ended", "tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("cpu_seconds")
    with op.batch_alter_table("keys") as batch:
        batch.drop_column("cpu_seconds_per_day")
        batch.drop_column("caps")
