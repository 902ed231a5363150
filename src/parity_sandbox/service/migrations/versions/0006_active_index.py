"""An index for the quota count (a key's tasks queued or running), which otherwise walked
every task the key ever had.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_key_state", "tasks", ["key_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_tasks_key_state", "tasks")
