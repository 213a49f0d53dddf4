"""Reference CDP host: reads Segment-spec JSONL, validates, de-duplicates and calls the hooks.

Guarantees, for every run: ``received == applied + duplicates + dead_lettered``. Each batch is one
transaction (its applied events and its dead letters commit together or not at all). When a plugin
fails on a batch, the batch is rolled back and replayed one event at a time so only the events
that fail are dead-lettered. Re-ingesting the same input applies nothing twice (``messageId``)
and records each bad line once (its sha256).
"""

from __future__ import annotations

import gc
import hashlib
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import pluggy
from sqlalchemy import Connection, bindparam, select

from .errors import CDPFederatedError, EventValidationError, SourceUnavailableError, StoreError
from .events import Event, EventBatch, parse_event_line
from .settings import get_setting
from .store import Store, schema

__all__ = ["Host", "IngestStats"]

_RAW_KEEP = 65536  # bytes of an oversized line kept as evidence
_IN_CHUNK = 900  # ids per IN (...) lookup: under SQLite's variable limit on any build


@dataclass
class IngestStats:
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    batches: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _DeadLetter:
    line_no: int
    code: str
    reason: str
    raw: bytes


@contextmanager
def _gc_relaxed() -> Iterator[None]:
    """Batches allocate many short-lived, acyclic dicts; the cyclic GC's frequent young-generation
    scans of them cost more than parsing itself, so they are made rarer during a run."""
    old = gc.get_threshold()
    gc.set_threshold(200_000, 50, 50)
    try:
        yield
    finally:
        gc.set_threshold(*old)


@dataclass
class _Parsed:
    lines: list[tuple[int, bytes]]
    now: datetime
    valid: dict[str, tuple[int, bytes, Event]]
    dead: list[_DeadLetter]
    in_batch_duplicates: int
    nbytes: int


_DONE = object()


class Host:
    """Feeds events to the plugins. ``now`` is injectable so validation is testable."""

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
        """Parsing runs in a reader thread one batch ahead of the writer, so the second core
        parses while the database (which releases the GIL) writes."""
        stats = IngestStats()
        ready: queue.Queue[Any] = queue.Queue(maxsize=2)
        stop = threading.Event()

        def reader() -> None:
            try:
                for lines in self._batches(stream, source):
                    parsed = self._parse(lines)
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
        with _gc_relaxed():
            thread.start()
            try:
                while (item := ready.get()) is not _DONE:
                    if isinstance(item, BaseException):
                        raise item
                    self._apply(item, source, stats)
                    if on_progress:
                        on_progress(item.nbytes)
            finally:
                stop.set()
                thread.join()
        self.pm.hook.cdp_ingest_finished(store=self.store, stats=stats.to_dict())
        return stats

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

    def _parse(self, lines: list[tuple[int, bytes]]) -> _Parsed:
        now = self._now()
        valid: dict[str, tuple[int, bytes, Event]] = {}
        dead: list[_DeadLetter] = []
        duplicates = 0
        for line_no, line in lines:
            try:
                ev = parse_event_line(
                    line, now=now, max_skew=self.max_skew, max_bytes=self.max_event_bytes
                )
            except EventValidationError as exc:
                dead.append(_DeadLetter(line_no, exc.code, str(exc), line))
                continue
            if ev.message_id in valid:
                duplicates += 1
            else:
                valid[ev.message_id] = (line_no, line, ev)
        nbytes = sum(len(line) + 1 for _, line in lines)
        return _Parsed(lines, now, valid, dead, duplicates, nbytes)

    def _apply(self, parsed: _Parsed, source: str, stats: IngestStats) -> None:
        now, dead = parsed.now, parsed.dead
        seen = self._already_applied(list(parsed.valid))
        fresh = [item for mid, item in parsed.valid.items() if mid not in seen]
        batch = EventBatch(events=[ev for _, _, ev in fresh], received_at=now, source=source)
        try:
            with self.store.begin() as conn:
                self._write_dead_letters(conn, dead, source, now)
                if batch.events:
                    self.pm.hook.cdp_process_events(batch=batch, conn=conn, store=self.store)
        except StoreError:
            raise
        except Exception:  # noqa: BLE001 - a plugin failed: isolate the failing events
            self._replay_one_by_one(fresh, dead, source, now, stats)
        else:
            stats.applied += len(batch.events)
            stats.dead_lettered += len(dead)
        # Counted only once the batch is committed, so the invariant holds even on a crash.
        stats.received += len(parsed.lines)
        stats.duplicates += parsed.in_batch_duplicates + len(seen)
        stats.batches += 1

    def _replay_one_by_one(
        self,
        fresh: list[tuple[int, bytes, Event]],
        dead: list[_DeadLetter],
        source: str,
        now: datetime,
        stats: IngestStats,
    ) -> None:
        for line_no, line, ev in fresh:
            single = EventBatch(events=[ev], received_at=now, source=source)
            try:
                with self.store.begin() as conn:
                    self.pm.hook.cdp_process_events(batch=single, conn=conn, store=self.store)
                stats.applied += 1
            except StoreError:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded as the dead letter's reason
                reason = (
                    exc.to_dict()["message"] if isinstance(exc, CDPFederatedError) else repr(exc)
                )
                dead.append(
                    _DeadLetter(line_no, "plugin_error", f"a plugin failed: {reason}", line)
                )
        with self.store.begin() as conn:
            self._write_dead_letters(conn, dead, source, now)
        stats.dead_lettered += len(dead)

    def _already_applied(self, message_ids: list[str]) -> set[str]:
        if not message_ids:
            return set()
        col = schema.events.c.message_id
        stmt = select(col).where(col.in_(bindparam("ids", expanding=True)))
        found: set[str] = set()
        try:
            with self.store.engine.connect() as conn:
                for start in range(0, len(message_ids), _IN_CHUNK):
                    chunk = message_ids[start : start + _IN_CHUNK]
                    found.update(r[0] for r in conn.execute(stmt, {"ids": chunk}))
        except Exception as exc:  # noqa: BLE001 - any driver error means the store is unusable
            raise StoreError(
                f"database error while de-duplicating: {exc}",
                field="db",
                value=self.store.display_url,
                fix="check that the database is running; nothing from this batch was written",
            ) from exc
        return found

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
