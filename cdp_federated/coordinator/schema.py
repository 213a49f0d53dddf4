"""The coordinator's own SQLAlchemy schema (separate from a participant's, in :mod:`..store.schema`).

A plain list of tables on :data:`metadata`; :func:`create_coordinator_schema` creates them and
records :data:`COORDINATOR_SCHEMA_VERSION` in ``coord_meta``. Every table name starts with
``coord_`` so a coordinator may share a database with a participant's store (the localhost demo)
without a clash. Times are timezone-aware UTC datetimes (on SQLite, UTC text without an offset:
always bind UTC values).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from ..errors import SchemaVersionError, StoreError
from ..store import Store, make_engine

__all__ = [
    "COORDINATOR_SCHEMA_VERSION",
    "metadata",
    "coord_meta",
    "participants",
    "enrolments",
    "used_jti",
    "jobs",
    "tasks",
    "frames",
    "results",
    "checkpoints",
    "job_resumes",
    "leases",
    "relay_keys",
    "relay_envelopes",
    "create_coordinator_schema",
    "open_coordinator_store",
]

COORDINATOR_SCHEMA_VERSION = 1

metadata = MetaData()

coord_meta = Table(
    "coord_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Enrolled principals (participants, observers, admins). A disabled one keeps its row (audit) and
# its tokens stop verifying (see EnrolmentRegistry.is_active).
participants = Table(
    "coord_participants",
    metadata,
    Column("participant_id", String(128), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("enrolled_at", DateTime(timezone=True), nullable=False),
    Column("disabled_at", DateTime(timezone=True)),
)

# One-time enrolment secrets: only the SHA-256 of the secret is stored; ``used_at`` is set once.
enrolments = Table(
    "coord_enrolments",
    metadata,
    Column("secret_sha256", String(64), primary_key=True),
    Column("participant_id", String(128), nullable=False, index=True),
    Column("role", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True)),
)

# Replay cache of one-time tokens: a jti is inserted once (insert-or-fail) and kept until the
# token could no longer verify anyway (its exp plus the verifier's leeway).
used_jti = Table(
    "coord_used_jti",
    metadata,
    Column("jti", String(128), primary_key=True),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_coord_used_jti_expires", "expires_at"),
)


# --- the service's job queue (coordinator.state) -------------------------------------------------

# One federated job: its spec and participants (JSON text), options, status and, once done, its
# aggregate result (metrics, per-round history without per-party values, the model). ``status`` is
# queued / running / succeeded / failed.
jobs = Table(
    "coord_jobs",
    metadata,
    Column("job_id", String(128), primary_key=True),
    Column("spec", Text, nullable=False),
    Column("participants", Text, nullable=False),
    Column("options", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("rounds_done", Integer, nullable=False, default=0),
    Column("history", Text, nullable=False, default="[]"),
    Column("result", Text),
    Column("error", Text),
    Column("submitted_by", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
)

# One request to one participant: the encoded CDPF frame and until when a reply is awaited. ``seq``
# orders a job's requests; (job, seq, attempt) is unique. ``status``: pending (not answered yet,
# deliverable again until answered or expired), done, expired. The frame is in ``coord_frames``
# under (job, ``request_frame``) when that is set (``request`` is then empty): a round sends the
# same bytes to every participant, stored once. Rows written before that column existed keep
# their frame in ``request``.
tasks = Table(
    "coord_tasks",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("job_id", String(128), nullable=False),
    Column("participant_id", String(128), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("stage", String(32), nullable=False),
    Column("round", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("request", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("deadline_at", DateTime(timezone=True), nullable=False),
    Column("deliveries", Integer, nullable=False, default=0),
    Column("last_delivered_at", DateTime(timezone=True)),
    Column("request_frame", String(32)),
    UniqueConstraint("job_id", "seq", "attempt", name="uq_coord_tasks_job_seq_attempt"),
    Index("ix_coord_tasks_poll", "participant_id", "status", "created_at"),
)

# Request frames, each stored once: the tasks of a batch that carry identical bytes (a round's
# FitIns with the global model) point to one row. ``frame_id`` is random (the coordinator finds
# identical frames by comparing bytes; hashing 2.4 MB would cost more). Frames no pending task of
# the job needs any more are deleted when the job queues new tasks, and all of a job's when it
# finishes.
frames = Table(
    "coord_frames",
    metadata,
    Column("job_id", String(128), primary_key=True),
    Column("frame_id", String(32), primary_key=True),
    Column("body", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# A participant's reply to one task, stored once: a repeated submission of the same bytes gets
# the stored acknowledgement back, other bytes are refused (``reply_sha256`` decides). ``reply`` is
# empty when the process that queued the task received it: that process's job runner takes the
# reply from memory (a crash there repeats the round anyway, see docs/runtime.md), so only the
# digest needs to be durable.
results = Table(
    "coord_results",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("job_id", String(128), nullable=False),
    Column("participant_id", String(128), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("reply", LargeBinary, nullable=False),
    Column("reply_sha256", String(64), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("seconds", Float, nullable=False),
)


# A job's latest round checkpoint (coordinator.checkpoint: global parameters, standardisation,
# preconditioner, strategy state, history; numpy .npy buffers and JSON, never pickle), written in
# the same transaction as the round's history entry. ``round`` 0: standardisation done, no round yet.
checkpoints = Table(
    "coord_checkpoints",
    metadata,
    Column("job_id", String(128), primary_key=True),
    Column("round", Integer, nullable=False),
    Column("state", LargeBinary, nullable=False),
    Column("written_at", DateTime(timezone=True), nullable=False),
)

# One row each time a restarted coordinator resumed a job (status shows them; no per-party value).
job_resumes = Table(
    "coord_job_resumes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(128), nullable=False, index=True),
    Column("from_round", Integer, nullable=False),
    Column("resumed_at", DateTime(timezone=True), nullable=False),
)

# The leader lease (coordinator.lease): which coordinator process may run jobs on this database.
# ``token`` (the fencing token) grows by one on every acquisition; times are the database's clock
# in seconds since the epoch; ``fenced_writes`` counts the holder's fenced commits (each one
# updates the row, which also serialises it with a takeover).
leases = Table(
    "coord_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(256), nullable=False),
    Column("address", String(512)),
    Column("token", BigInteger, nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("renewed_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("fenced_writes", BigInteger, nullable=False, default=0),
)


# --- the relay (coordinator.relay) ---------------------------------------------------------------

# Participants' X25519 relay public keys (raw, hex). Every key ever published keeps its row:
# ``version`` counts a participant's keys, ``replaced_at`` is set when a newer one replaced it.
relay_keys = Table(
    "coord_relay_keys",
    metadata,
    Column("participant_id", String(128), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("public_key", String(64), nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=False),
    Column("replaced_at", DateTime(timezone=True)),
)

# Sealed envelopes between participants of a job: the routing header the coordinator can read,
# the frame's SHA-256 and size, and the frame itself until the recipient acknowledges it (then
# ``body`` is NULL: the header row stays so that a replayed seq is still refused). Every row of
# a job is deleted when the job finishes.
relay_envelopes = Table(
    "coord_relay_envelopes",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("job_id", String(128), nullable=False),
    Column("sender", String(128), nullable=False),
    Column("recipient", String(128), nullable=False),
    Column("session", String(256), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("size", Integer, nullable=False),
    Column("body_sha256", String(64), nullable=False),
    Column("body", LargeBinary),
    Column("posted_at", DateTime(timezone=True), nullable=False),
    Column("acked_at", DateTime(timezone=True)),
    UniqueConstraint(
        "job_id", "sender", "recipient", "session", "seq", name="uq_coord_relay_stream_seq"
    ),
    Index("ix_coord_relay_inbox", "job_id", "recipient", "acked_at", "id"),
)


def _version(store: Store) -> int | None:
    try:
        names = set(inspect(store.engine).get_table_names())
    except OperationalError as exc:
        raise StoreError(
            f"cannot connect to database: {exc.orig}",
            field="db",
            value=store.display_url,
            fix="start the database or correct the coordinator's database URL",
        ) from exc
    if coord_meta.name not in names:
        return None
    with store.engine.connect() as conn:
        row = conn.execute(
            select(coord_meta.c.value).where(coord_meta.c.key == "schema_version")
        ).first()
    return int(row[0]) if row else None


# Nullable columns added to existing tables within this schema version: (table, column). A
# database created before them gets them on the next start (``create_all`` adds only tables).
_ADDED_COLUMNS = ((tasks, "request_frame"),)


def _add_missing_columns(conn: Connection) -> None:
    inspector = inspect(conn)
    for table, name in _ADDED_COLUMNS:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        if name not in present:
            column = table.c[name]
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}"))


def create_coordinator_schema(store: Store) -> int:
    """Create (or confirm) the coordinator's tables; returns the version. Refuses a database whose
    coordinator schema has another version."""
    version = _version(store)
    if version is not None and version != COORDINATOR_SCHEMA_VERSION:
        raise SchemaVersionError(
            "coordinator schema version is not supported by this release",
            field="coordinator_schema_version",
            value=version,
            fix=f"use a database created by a release with coordinator schema version "
            f"{COORDINATOR_SCHEMA_VERSION}",
        )
    with store.begin() as conn:
        metadata.create_all(conn)
        _add_missing_columns(conn)
        if version is None:
            conn.execute(
                coord_meta.insert(),
                [{"key": "schema_version", "value": str(COORDINATOR_SCHEMA_VERSION)}],
            )
    return COORDINATOR_SCHEMA_VERSION


def open_coordinator_store(url: str, *, create: bool = False) -> Store:
    """A :class:`Store` on the coordinator's database (same engine setup as a participant's store:
    SQLite pragmas, PostgreSQL pre-ping). With ``create=True`` the coordinator schema is created
    when absent; otherwise a database without it is an error."""
    store = Store(make_engine(url))
    version = _version(store)
    if version is None and not create:
        raise SchemaVersionError(
            "database has no coordinator schema",
            field="db",
            value=store.display_url,
            fix="open it with create=True (the coordinator creates its tables on first start)",
        )
    if create or version != COORDINATOR_SCHEMA_VERSION:
        # creates what is missing (tables added within this schema version too), or raises for
        # another version
        create_coordinator_schema(store)
    return store
