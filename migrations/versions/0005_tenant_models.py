"""Models a tenant brings (POST /v1/models): uploaded HF folders and registered s3:// prefixes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("source", sa.String(1100), nullable=False),
        sa.Column("storage_prefix", sa.String(1000), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("error", sa.JSON, nullable=True),
        sa.Column("family", sa.String(40), nullable=False),
        sa.Column("model_type", sa.String(64), nullable=False),
        sa.Column("parameters", sa.BigInteger, nullable=False),
        sa.Column("towers", sa.JSON, nullable=False),
        sa.Column("dtype", sa.String(40), nullable=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("files", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_models_tenant_id_id", "models", ["tenant_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_models_tenant_id_id", "models")
    op.drop_table("models")
