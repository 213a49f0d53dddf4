"""Reference CDP host: reads Segment-spec JSONL, validates, de-duplicates and calls the hooks.

Guarantees, for every run: ``received == applied + duplicates + dead_lettered``. Each batch is
atomic (its applied events and its dead letters commit together or not at all). When a plugin
fails on a batch, the batch is rolled back and replayed one event at a time so only the events
that fail are dead-lettered. Re-ingesting the same input applies nothing twice (``messageId``)
and records each bad line once (its sha256).

Threads: a parsing thread decodes, validates and (for the built-in ingest plugin) builds each
batch's rows, one or two batches ahead of the writer, which de-duplicates and calls the hooks.
The database works without the GIL, so the two cores overlap.

Commits: each batch runs in a SAVEPOINT of the writer's transaction; the writer commits as soon as
it has caught up with the parser (so a slow or live source has every batch committed right away)
and, under load, every :data:`_GROUP_EVENTS` events at the latest. A commit costs about the pages
the transaction dirtied, and random ``messageId`` keys dirty pages all over the index, so grouping
batches under load keeps throughput from falling as the database grows. Counts are updated only
once committed.
"""

from __future__ import annotations

import gc
import hashlib
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import pluggy
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from . import ingest as builtin_ingest
from .errors import CDPFederatedError, EventValidationError, SourceUnavailableError, StoreError
from .events import Event, EventBatch, decode_event_line
from .settings import get_setting
from .store import Store, schema

__all__ = ["Host", "IngestStats"]

_RAW_KEEP = 65536  # bytes of an oversized line kept as evidence
_GROUP_EVENTS = 200_000  # under load, commit at least every this many events (whole batches)
_SWITCH_INTERVAL = 0.0005  # seconds; see _run_tuning


@dataclass
class IngestStats:
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    batches: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def add(self, other: IngestStats) -> None:
        self.received += other.received
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.dead_lettered += other.dead_lettered
        self.batches += other.batches


@dataclass
class _DeadLetter:
    line_no: int
    code: str
    reason: str
    raw: bytes


@contextmanager
def _run_tuning() -> Iterator[None]:
    """Interpreter settings for a run, restored afterwards.

    * Batches allocate many short-lived, acyclic dicts; the cyclic GC's frequent young-generation
      scans of them cost more than parsing itself, so they are made rarer.
    * The writer thread hands the GIL back and forth with the parsing thread around every database
      call (the database works without the GIL). With the default 5 ms switch interval it waits up
      to 5 ms for the GIL after each call while the parser runs; a shorter interval keeps both busy.
    """
    old_gc = gc.get_threshold()
    old_switch = sys.getswitchinterval()
    gc.set_threshold(200_000, 50, 50)
    sys.setswitchinterval(min(old_switch, _SWITCH_INTERVAL))
    try:
        yield
    finally:
        gc.set_threshold(*old_gc)
        sys.setswitchinterval(old_switch)


@dataclass
class _Parsed:
    lines: list[tuple[int, bytes]]
    now: datetime
    valid: dict[str, tuple[int, bytes, Event]]  # by messageId, first occurrence, in input order
    dead: list[_DeadLetter]
    in_batch_duplicates: int
    nbytes: int
    events: list[Event]  # the valid events, in input order
    prepared: builtin_ingest.PreparedRows | None  # their rows, when the built-in plugin is used
    generation: int  # of the _KnownIdentifiers the rows were prepared against
    maybe_seen: list[str]  # valid ids that may have occurred in an earlier batch of the run


@dataclass
class _Group:
    """What the open transaction holds: counted into the run's stats once it commits."""

    stats: IngestStats = field(default_factory=IngestStats)
    events: int = 0  # events written, to bound the group


class _Seen:
    """De-duplication state of one run (the writer's side).

    The exact check is a lookup of the batch's messageIds in ``events`` through the writer's
    connection (so the open transaction's rows count). When the run started on an empty ``events``
    table and, on SQLite, no other connection has committed since (``PRAGMA data_version``), the
    only possible duplicates are this run's own earlier events: then only the ids that
    :class:`_IdFilter` says may have been seen before in the run are looked up.
    """

    def __init__(self) -> None:
        self.fast: bool | None = None  # None: not decided yet (first transaction)
        self.data_version: Any = None

    def start_transaction(self, conn: Connection, store: Store) -> None:
        """Called first thing in each of the writer's transactions (which holds the write lock)."""
        if self.fast is False:
            return
        if store.dialect != "sqlite":
            self.fast = False
            return
        version = conn.exec_driver_sql("PRAGMA data_version").scalar()
        if self.fast is None:
            table = conn.dialect.identifier_preparer.quote(schema.events.name)
            self.fast = conn.exec_driver_sql(f"SELECT 1 FROM {table} LIMIT 1").first() is None
        elif version != self.data_version:  # another connection committed: look everything up
            self.fast = False
        self.data_version = version

    def to_look_up(self, parsed: _Parsed) -> list[str]:
        return parsed.maybe_seen if self.fast else list(parsed.valid)


class _KnownIdentifiers:
    """Identifier keys written earlier in the run by batches whose rows the parsing thread
    prepared: later batches leave them out (re-inserting them would do nothing, ON CONFLICT).

    Sound only while every batch prepared against it is written whole, so the writer resets it
    (a new generation) whenever a batch is not written as prepared (a plugin failed, or some
    events were already in the database), and ignores rows prepared against an older generation.
    """

    def __init__(self) -> None:
        self.keys: set[tuple[str, str, str]] = set()
        self.generation = 0

    def reset(self) -> None:
        self.keys = set()
        self.generation += 1


class _IdFilter:
    """Which messageIds may have occurred earlier in the run (the parsing thread's side).

    One byte per bucket of the ids' hashes: no false negatives (an id seen before always hits),
    a few percent of false positives (which only cost a database lookup). 32 MiB, allocated
    lazily by the OS as buckets are touched; about 0.1 us per id.
    """

    _BITS = 25

    def __init__(self) -> None:
        import numpy as np

        self._np = np
        self._buckets = np.zeros(1 << self._BITS, dtype=np.uint8)

    def check_and_add(self, ids: list[str]) -> list[str]:
        """The ids that may have been added before (by an earlier call); then adds them all."""
        np = self._np
        if not ids:
            return []
        slots = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))
        slots &= (1 << self._BITS) - 1
        hits = np.flatnonzero(self._buckets[slots])
        self._buckets[slots] = 1
        return [ids[i] for i in hits.tolist()]


class _Run:
    """State shared by one run's two threads."""

    def __init__(self, host: Host) -> None:
        # Build the built-in plugin's rows in the parsing thread (when it is registered).
        self.prepare = host.prepare_ahead and host.pm.is_registered(builtin_ingest)
        self.id_filter = _IdFilter() if host.store.dialect == "sqlite" else None
        self.known = _KnownIdentifiers()
        self.seen = _Seen()  # the writer's


_DONE = object()


class Host:
    """Feeds events to the plugins. ``now`` is injectable so validation is testable."""

    # Build the built-in ingest plugin's rows in the parsing thread (off: the hook builds them).
    prepare_ahead = True

    def __init__(
        self,
        store: Store,
        pm: pluggy.PluginManager,
        *,
        batch_size: int | None = None,
        max_event_bytes: int | None = None,
        max_skew: timedelta | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.store = store
        self.pm = pm
        self.batch_size = batch_size or int(get_setting("batch_size"))
        self.max_event_bytes = max_event_bytes or int(get_setting("max_event_bytes"))
        self.max_skew = max_skew or timedelta(days=int(get_setting("max_clock_skew_days")))
        self._now = now or (lambda: datetime.now(UTC))
        store.tcf_vendor_ids  # noqa: B018 - read the ledger's TCF vendors once, before any batch

    # --- entry points ----------------------------------------------------------------------------

    @staticmethod
    def open_events(path: str | Path) -> BinaryIO:
        """Open a JSONL file (``-``: standard input) with a clear error when it cannot be read."""
        if str(path) == "-":
            return sys.stdin.buffer
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        except OSError as exc:
            raise SourceUnavailableError(
                f"cannot open events file: {exc.strerror}",
                field="path",
                value=str(path),
                fix="check the path and that the file is readable",
            ) from exc

    def ingest_path(
        self, path: str | Path, *, on_progress: Callable[[int], None] | None = None
    ) -> IngestStats:
        """Ingest a JSONL file, or standard input when ``path`` is ``-``."""
        handle = self.open_events(path)
        try:
            return self.ingest_stream(handle, source=str(path), on_progress=on_progress)
        finally:
            if handle is not sys.stdin.buffer:
                handle.close()

    def ingest_stream(
        self,
        stream: BinaryIO | Iterable[bytes],
        *,
        source: str = "-",
        on_progress: Callable[[int], None] | None = None,
    ) -> IngestStats:
        """Parsing runs in a reader thread one or two batches ahead of the writer, so the second
        core parses while the database (which releases the GIL) writes."""
        stats = IngestStats()
        ready: queue.Queue[Any] = queue.Queue(maxsize=2)
        # Applied batches go back to the reader to be freed there: freeing thousands of events'
        # objects is GIL-bound work, and the reader has spare time while the writer has none.
        done: queue.SimpleQueue[_Parsed] = queue.SimpleQueue()
        stop = threading.Event()
        run = _Run(self)

        def reader() -> None:
            try:
                for lines in self._batches(stream, source):
                    while not done.empty():
                        done.get_nowait()
                    parsed = self._parse(lines, run)
                    while not stop.is_set():
                        try:
                            ready.put(parsed, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                ready.put(_DONE)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the writer thread
                ready.put(exc)

        thread = threading.Thread(target=reader, name="cdp-ingest-reader", daemon=True)
        with _run_tuning():
            thread.start()
            try:
                self._write(ready, done, run, source, stats, on_progress)
            finally:
                stop.set()
                thread.join()
        self.store.checkpoint()
        self.pm.hook.cdp_ingest_finished(store=self.store, stats=stats.to_dict())
        return stats

    def _write(
        self,
        ready: queue.Queue[Any],
        done: queue.SimpleQueue[_Parsed],
        run: _Run,
        source: str,
        stats: IngestStats,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        """The writer: applies parsed batches in the order read, committing them in groups."""
        group = _Group()
        with self.store.writer() as conn:
            while True:
                try:
                    item = ready.get_nowait()
                except queue.Empty:  # caught up with the parser: make what we have durable
                    self._commit(conn, group, stats)
                    item = ready.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    self._commit(conn, group, stats)  # the applied batches are whole: keep them
                    raise item
                if not group.stats.batches:
                    self._start_transaction(conn, run.seen)
                self._apply(conn, item, source, group, run)
                if on_progress:
                    on_progress(item.nbytes)
                done.put(item)
                del item
                if group.events >= _GROUP_EVENTS:
                    self._commit(conn, group, stats)
            self._commit(conn, group, stats)

    def ingest_events(
        self, events: Iterable[dict[str, Any]], *, source: str = "api"
    ) -> IngestStats:
        """Ingest already-decoded event objects (what a CDP's in-process pipeline hands over)."""
        import orjson

        return self.ingest_stream((orjson.dumps(e) for e in events), source=source)

    # --- internals -------------------------------------------------------------------------------

    def _batches(self, stream: Iterable[bytes], source: str) -> Iterator[list[tuple[int, bytes]]]:
        batch: list[tuple[int, bytes]] = []
        try:
            for line_no, line in enumerate(stream, start=1):
                line = line.strip()
                if not line:
                    continue
                batch.append((line_no, line))
                if len(batch) >= self.batch_size:
                    yield batch
                    batch = []
        except OSError as exc:
            raise SourceUnavailableError(
                f"reading events failed: {exc}",
                field="path",
                value=source,
                fix="fix the source and re-run; committed batches are kept and re-ingest is idempotent",
            ) from exc
        if batch:
            yield batch

    def _parse(self, lines: list[tuple[int, bytes]], run: _Run) -> _Parsed:
        """Decode and validate a batch; for the built-in plugin, build its rows too."""
        now = self._now()
        max_skew, max_bytes = self.max_skew, self.max_event_bytes
        valid: dict[str, tuple[int, bytes, Event]] = {}
        isos: list[Any] = []  # each valid event's timestamp text as received
        dead: list[_DeadLetter] = []
        duplicates = nbytes = 0
        for line_no, line in lines:
            nbytes += len(line) + 1
            try:
                ev, raw = decode_event_line(line, now=now, max_skew=max_skew, max_bytes=max_bytes)
            except EventValidationError as exc:
                dead.append(_DeadLetter(line_no, exc.code, str(exc), line))
                continue
            if ev.message_id in valid:
                duplicates += 1
            else:
                valid[ev.message_id] = (line_no, line, ev)
                isos.append(raw.get("timestamp") or raw.get("originalTimestamp"))
        events = [item[2] for item in valid.values()]
        prepared = None
        generation = run.known.generation  # read before its keys: see _KnownIdentifiers
        if run.prepare and events:
            try:
                prepared = builtin_ingest.prepare_rows(
                    events,
                    self.store,
                    now,
                    iso_timestamps=isos,
                    known_identifiers=run.known.keys,
                )
            except Exception:  # noqa: BLE001 - the hook will fail on it, where failures are handled
                prepared = None
        ids = list(valid)
        maybe_seen = run.id_filter.check_and_add(ids) if run.id_filter else ids
        return _Parsed(
            lines, now, valid, dead, duplicates, nbytes, events, prepared, generation, maybe_seen
        )

    def _start_transaction(self, conn: Connection, seen: _Seen) -> None:
        try:
            seen.start_transaction(conn, self.store)
        except DBAPIError as exc:
            raise self._store_error(exc) from exc

    def _commit(self, conn: Connection, group: _Group, stats: IngestStats) -> None:
        if not group.stats.batches:
            return
        try:
            conn.commit()
        except DBAPIError as exc:
            raise self._store_error(exc) from exc
        # Counted only once committed, so the invariant holds even on a crash.
        stats.add(group.stats)
        group.stats = IngestStats()
        group.events = 0

    def _store_error(self, exc: DBAPIError) -> BaseException:
        return self.store.store_error(exc) or exc

    def _raise_if_store_failed(self, exc: Exception) -> None:
        """A database that failed (rather than a plugin) aborts the run: StoreError."""
        if isinstance(exc, DBAPIError):
            error = self.store.store_error(exc)
            if error is not None:
                raise error from exc

    def _apply(
        self,
        conn: Connection,
        parsed: _Parsed,
        source: str,
        group: _Group,
        run: _Run,
    ) -> None:
        """Apply one batch inside the open transaction, in a savepoint: whole or not at all."""
        now, dead = parsed.now, parsed.dead
        known = run.known
        candidates = run.seen.to_look_up(parsed)
        applied = self._already_applied(conn, candidates) if candidates else set()
        if applied:
            known.reset()  # the batch is not written as prepared
            fresh = [item for mid, item in parsed.valid.items() if mid not in applied]
            batch = EventBatch(events=[ev for _, _, ev in fresh], received_at=now, source=source)
        else:  # the common case: the parsing thread's rows are for exactly these events
            fresh = list(parsed.valid.values())
            batch = EventBatch(events=parsed.events, received_at=now, source=source)
            if parsed.prepared is not None and parsed.generation == known.generation:
                batch.prepared[builtin_ingest.__name__] = parsed.prepared
        counts = group.stats
        try:
            with conn.begin_nested():
                self._write_dead_letters(conn, dead, source, now)
                if batch.events:
                    self.pm.hook.cdp_process_events(batch=batch, conn=conn, store=self.store)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin failed: isolate the failing events
            self._raise_if_store_failed(exc)
            known.reset()  # the batch is not written as prepared
            self._replay_one_by_one(conn, fresh, dead, source, now, counts)
        else:
            counts.applied += len(batch.events)
            counts.dead_lettered += len(dead)
        group.events += len(batch.events)
        counts.received += len(parsed.lines)
        counts.duplicates += parsed.in_batch_duplicates + len(applied)
        counts.batches += 1

    def _replay_one_by_one(
        self,
        conn: Connection,
        fresh: list[tuple[int, bytes, Event]],
        dead: list[_DeadLetter],
        source: str,
        now: datetime,
        counts: IngestStats,
    ) -> None:
        for line_no, line, ev in fresh:
            single = EventBatch(events=[ev], received_at=now, source=source)
            try:
                with conn.begin_nested():
                    self.pm.hook.cdp_process_events(batch=single, conn=conn, store=self.store)
                counts.applied += 1
            except StoreError:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded as the dead letter's reason
                self._raise_if_store_failed(exc)
                reason = (
                    exc.to_dict()["message"] if isinstance(exc, CDPFederatedError) else repr(exc)
                )
                dead.append(
                    _DeadLetter(line_no, "plugin_error", f"a plugin failed: {reason}", line)
                )
        try:
            with conn.begin_nested():
                self._write_dead_letters(conn, dead, source, now)
        except DBAPIError as exc:
            raise self._store_error(exc) from exc
        counts.dead_lettered += len(dead)

    def _already_applied(self, conn: Connection, message_ids: list[str]) -> set[str]:
        try:
            return self.store.existing_keys(conn, schema.events, "message_id", message_ids)
        except DBAPIError as exc:
            raise StoreError(
                f"database error while de-duplicating: {exc.orig}",
                field="db",
                value=self.store.display_url,
                fix="check that the database is running; the batch was rolled back",
            ) from exc

    def _write_dead_letters(
        self, conn: Connection, dead: list[_DeadLetter], source: str, now: datetime
    ) -> None:
        if not dead:
            return
        rows = [
            {
                "received_at": now,
                "source": source[:512],
                "line_no": d.line_no,
                "code": d.code,
                "reason": d.reason,
                "raw": d.raw[:_RAW_KEEP].decode("utf-8", errors="replace"),
                "fingerprint": hashlib.sha256(d.raw).hexdigest(),
            }
            for d in dead
        ]
        self.store.insert_ignore(conn, schema.dead_letters, rows, ("fingerprint",))
