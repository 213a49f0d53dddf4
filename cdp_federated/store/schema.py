"""The local store's SQLAlchemy schema (one participant's database).

Version :data:`SCHEMA_VERSION` is recorded in the ``meta`` table; :func:`cdp_federated.store.create_schema`
creates it explicitly and :func:`cdp_federated.store.open_store` refuses a database of another version.
Times are stored as timezone-aware UTC datetimes.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

SCHEMA_VERSION = 2  # 2: audit checkpoints and the privacy budget ledger

metadata = MetaData()

meta = Table(
    "cdp_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# One row per known person. ``profile_id`` is the host's userId, or the anonymousId until an
# identify/alias links it to a userId.
profiles = Table(
    "profiles",
    metadata,
    Column("profile_id", String(256), primary_key=True),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    Column("jurisdiction", String(16)),
    Column("traits", JSON(none_as_null=True)),
)

# Identifiers seen for a profile (email, phone, anonymous_id, user_id, device_id, alias...).
# Raw values stay in this participant's database; they never cross the wire.
identifiers = Table(
    "identifiers",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("profile_id", String(256), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("value", String(512), nullable=False),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    UniqueConstraint("kind", "value", "profile_id", name="uq_identifier"),
)

# Accepted events. ``message_id`` is the idempotency key: re-ingesting a file applies nothing twice.
events = Table(
    "events",
    metadata,
    Column("message_id", String(256), primary_key=True),
    Column("type", String(16), nullable=False),
    Column("event", String(256)),
    Column("profile_id", String(256), nullable=False),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("revenue", Float),
    Column("properties", JSON(none_as_null=True)),
    Index("ix_events_profile_ts", "profile_id", "timestamp"),
)

# Consent ledger: immutable signal records; the state at time T is derived, never updated in place.
consent_records = Table(
    "consent_records",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("profile_id", String(256), nullable=False),
    Column("source", String(32), nullable=False),
    Column("purpose", String(128), nullable=False),
    Column("granted", Boolean, nullable=False),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("jurisdiction", String(16)),
    Column("message_id", String(256)),
    Column("raw", Text),
    Index("ix_consent_profile_purpose_ts", "profile_id", "purpose", "timestamp"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("source", String(512)),
    Column("line_no", Integer),
    Column("code", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("raw", Text),
    # sha256 of the raw line: re-ingesting the same bad line records it once.
    Column("fingerprint", String(64), nullable=False, unique=True),
)

# Per-profile features derived from events (see cdp_federated.features.FEATURE_COLUMNS).
profile_features = Table(
    "profile_features",
    metadata,
    Column("profile_id", String(256), primary_key=True),
    Column("as_of", DateTime(timezone=True), nullable=False),
    Column("recency_days", Float, nullable=False),
    Column("tenure_days", Float, nullable=False),
    Column("frequency", Float, nullable=False),
    Column("monetary", Float, nullable=False),
    Column("avg_order_value", Float, nullable=False),
    Column("events_7d", Float, nullable=False),
    Column("events_30d", Float, nullable=False),
    Column("events_90d", Float, nullable=False),
    Column("orders_30d", Float, nullable=False),
    Column("orders_90d", Float, nullable=False),
    Column("revenue_90d", Float, nullable=False),
    Column("page_views_30d", Float, nullable=False),
    Column("product_views_30d", Float, nullable=False),
    Column("cart_adds_30d", Float, nullable=False),
    Column("distinct_events", Float, nullable=False),
)

# Labels derived for a training target (e.g. "ordered in the 30 days after as_of").
profile_labels = Table(
    "profile_labels",
    metadata,
    Column("profile_id", String(256), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("as_of", DateTime(timezone=True), nullable=False),
    Column("value", Float, nullable=False),
)

audit_entries = Table(
    "audit_entries",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

# Signed chain heads. The signing key lives outside the database, so a writer of this table
# cannot forge a checkpoint; the latest head is also anchored outside the database (see
# governance/audit.py) so deleting the newest checkpoints with the tail is detected too.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("entry_seq", Integer, nullable=False),
    Column("head_hash", String(64), nullable=False),
    Column("signed_at", DateTime(timezone=True), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("signature", String(128), nullable=False),
)

# Epsilon charged per data source by each job; a job is charged once per source (idempotent).
privacy_budget = Table(
    "privacy_budget",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source", String(128), nullable=False),
    Column("job_id", String(64), nullable=False),
    Column("policy_hash", String(64), nullable=False),
    Column("epsilon", Float, nullable=False),
    Column("delta", Float, nullable=False),
    Column("spent_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("source", "job_id", name="uq_privacy_budget_source_job"),
    Index("ix_privacy_budget_source_time", "source", "spent_at"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("result", JSON(none_as_null=True)),
)

models = Table(
    "models",
    metadata,
    Column("model_id", String(64), primary_key=True),
    Column("job_id", String(64)),
    Column("kind", String(32), nullable=False),
    Column("path", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("lineage", JSON, nullable=False),
)
