"""Initial schema: teams, API keys, host tokens, hosts, templates, sandboxes and their
metadata, snapshots, audit log.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: tuple[str, ...] | None = ("wrenn",)
depends_on: str | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_teams"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("team_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        _ts("last_used_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_api_keys_team_id_teams", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_team_id", "api_keys", ["team_id"])
    op.create_table(
        "host_tokens",
        sa.Column("token_hash", sa.String(64), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
        _ts("used_at", nullable=True),
        sa.PrimaryKeyConstraint("token_hash", name="pk_host_tokens"),
    )
    op.create_table(
        "hosts",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("address", sa.String(512), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory_mib", sa.BigInteger(), nullable=False),
        sa.Column("memory_free_mib", sa.BigInteger(), nullable=False),
        sa.Column("disk_mib", sa.BigInteger(), nullable=False),
        sa.Column("disk_free_mib", sa.BigInteger(), nullable=False),
        _ts("last_heartbeat_at", nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_hosts"),
        sa.UniqueConstraint("secret_hash", name="uq_hosts_secret_hash"),
    )
    op.create_table(
        "templates",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("team_id", sa.String(32), nullable=True),
        sa.Column("build_id", sa.String(64), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory_mib", sa.Integer(), nullable=False),
        sa.Column("disk_mib", sa.BigInteger(), nullable=False),
        sa.Column("envd_version", sa.String(32), nullable=False),
        sa.Column("public", sa.Boolean(), nullable=False),
        sa.Column("spawn_count", sa.Integer(), nullable=False),
        _ts("last_spawned_at", nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("deleted_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_templates"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_templates_team_id_teams", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_templates_team_id", "templates", ["team_id"])
    op.create_table(
        "sandboxes",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("team_id", sa.String(32), nullable=False),
        sa.Column("host_id", sa.String(32), nullable=True),
        sa.Column("template_id", sa.String(128), nullable=False),
        sa.Column("alias", sa.String(128), nullable=True),
        sa.Column("snapshot_id", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory_mib", sa.Integer(), nullable=False),
        sa.Column("disk_mib", sa.BigInteger(), nullable=False),
        sa.Column("envd_version", sa.String(32), nullable=False),
        sa.Column("envd_access_token", sa.String(128), nullable=False),
        sa.Column("allow_internet_access", sa.Boolean(), nullable=True),
        sa.Column("auto_pause", sa.Boolean(), nullable=False),
        sa.Column("auto_resume", sa.Boolean(), nullable=False),
        sa.Column("build_id", sa.String(64), nullable=True),
        _ts("started_at"),
        _ts("end_at"),
        _ts("created_at"),
        _ts("ended_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sandboxes"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_sandboxes_team_id_teams", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["host_id"], ["hosts.id"], name="fk_sandboxes_host_id_hosts", ondelete="SET NULL"
        ),
    )
    op.create_index("ix_sandboxes_host_id", "sandboxes", ["host_id"])
    op.create_index("ix_sandboxes_state", "sandboxes", ["state"])
    op.create_index("ix_sandboxes_end_at", "sandboxes", ["end_at"])
    op.create_index("ix_sandboxes_team_started", "sandboxes", ["team_id", "started_at", "id"])
    op.create_table(
        "sandbox_metadata",
        sa.Column("sandbox_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(256), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("sandbox_id", "key", name="pk_sandbox_metadata"),
        sa.ForeignKeyConstraint(
            ["sandbox_id"],
            ["sandboxes.id"],
            name="fk_sandbox_metadata_sandbox_id_sandboxes",
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("team_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("sandbox_id", sa.String(64), nullable=True),
        sa.Column("template_id", sa.String(128), nullable=False),
        sa.Column("host_id", sa.String(32), nullable=True),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory_mib", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_snapshots"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_snapshots_team_id_teams", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["host_id"], ["hosts.id"], name="fk_snapshots_host_id_hosts", ondelete="SET NULL"
        ),
        sa.UniqueConstraint("team_id", "name", name="uq_snapshots_team_id_name"),
    )
    op.create_index("ix_snapshots_sandbox_id", "snapshots", ["sandbox_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("team_id", sa.String(32), nullable=True),
        sa.Column("actor", sa.String(64), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target_type", sa.String(32), nullable=False),
        sa.Column("target_id", sa.String(128), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_team_id", "audit_log", ["team_id"])
    op.create_index("ix_audit_log_created_at", "audit_log", ["created_at"])


def downgrade() -> None:
    for table in (
        "audit_log",
        "snapshots",
        "sandbox_metadata",
        "sandboxes",
        "templates",
        "hosts",
        "host_tokens",
        "api_keys",
        "teams",
    ):
        op.drop_table(table)
