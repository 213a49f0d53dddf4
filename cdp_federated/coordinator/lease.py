"""The leader lease: of the coordinator processes sharing one database, only one runs jobs.

Two ``cdp-fl coordinator serve`` processes on one database (PostgreSQL, or an SQLite file) would
otherwise both resume and drive the same job. The lease is one row of ``coord_leases`` (holder,
its address, expiry, and a fencing ``token`` that grows by one on every acquisition):

- **Acquire.** A process takes the lease when there is none, when it expired, or when its holder
  is a process on this machine that no longer exists (so a coordinator restarted after ``kill -9``
  does not wait out the expiry). A takeover is a compare-and-set on the token it read, so of two
  standbys exactly one wins.
- **Renew.** The holder pushes the expiry ``seconds`` ahead every ``seconds / 3``. Expiries are
  the database's clock (SQLite ``julianday('now')``, PostgreSQL ``clock_timestamp()``), so
  coordinators on machines whose clocks disagree still agree on them; tests inject ``clock``.
  Locally the holder counts itself leader only until ``seconds`` after it *started* its last
  successful renewal (monotonic clock), which ends before the database-side expiry.
- **Fence.** :meth:`LeaderLease.fence` runs first in every transaction that moves a job on (task
  batches, round commits and checkpoints, job status): it updates the lease row only where holder
  and token are still ours. A holder that was paused past its expiry and woke up after a
  takeover finds the row changed and gets :class:`LeaseLostError`; the transaction rolls back and
  the job's thread stops (it is the new leader's job now). The update also orders the commit with
  a takeover on both databases (a row lock on PostgreSQL, the write lock on SQLite), so the new
  leader reads either the whole commit or none of it.

:class:`LeaseKeeper` runs the loop for one process and calls ``on_acquired`` (resume the jobs:
:func:`lead_with_lease` wires :meth:`.jobs.JobRunner.recover`) and ``on_lost`` (stop the job
threads; the process goes on as a standby).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from ..errors import CDPFederatedError, ConfigError, StoreError
from ..store import Store
from .queue_transport import JobInterrupted
from .schema import leases

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "LeaseInfo",
    "LeaseLostError",
    "NotLeaderError",
    "LeaderLease",
    "LeaseKeeper",
    "lead_with_lease",
    "process_identity",
]

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 15.0
LEASE_NAME = "coordinator"


class LeaseLostError(JobInterrupted):
    """This process no longer holds the leader lease (another coordinator took it over): the
    transaction was rolled back and the job's thread stops. The job is not failed: the new
    leader resumes it from its last committed round."""


class NotLeaderError(CDPFederatedError):
    """A request only the leader serves reached a standby (HTTP 503 with ``Retry-After``)."""

    http_status = 503

    def __init__(self, message: str, *, retry_after: float, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers = {"Retry-After": str(max(1, round(retry_after)))}


@dataclass(frozen=True)
class LeaseInfo:
    """The lease row: its holder (process identity), the holder's advertised URL, the fencing
    token, and when it was taken and expires (the database's clock, seconds since the epoch)."""

    name: str
    holder: str
    address: str | None
    token: int
    acquired_at: float
    expires_at: float


# --- who holds it ----------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or ''
    when there is no such process (or no /proc)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return ""
    return stat.rpartition(")")[2].split()[19]  # after the command name, which may hold spaces


def _machine() -> str:
    """This kernel and PID namespace: two processes with equal values see the same pids."""
    boot = _read("/proc/sys/kernel/random/boot_id").replace("-", "")[:16]
    try:
        pidns = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        pidns = ""
    return f"{socket.gethostname()[:64]}|{boot}|{pidns}"


def process_identity() -> str:
    """This process as a lease holder: host, boot id and PID namespace, pid, the process's start
    time (so a reused pid is not mistaken for it) and a random suffix (two leases of one process
    are two holders)."""
    pid = os.getpid()
    return f"{_machine()}|{pid}|{_start_time(pid)}|{secrets.token_hex(4)}"


def holder_gone(holder: str) -> bool:
    """True when ``holder`` was a process of this machine and PID namespace that has exited
    (its pid is free or now another process's). False whenever that cannot be known: another
    machine, no /proc, or an identity in another format."""
    parts = holder.split("|")
    if len(parts) != 6 or "|".join(parts[:3]) != _machine() or not all(parts[1:3]):
        return False
    pid, started = parts[3], parts[4]
    if not pid.isdigit() or not started:
        return False
    return _start_time(int(pid)) != started


# --- the lease -------------------------------------------------------------------------------------


def database_now(conn: Any) -> float:
    """The database server's current time in seconds since the epoch (SQLite: the time of the
    machine that opens the file; every process on it reads the same clock)."""
    if conn.dialect.name == "sqlite":
        sql = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    else:
        sql = "SELECT EXTRACT(EPOCH FROM clock_timestamp())"
    return float(conn.execute(text(sql)).scalar())


class LeaderLease:
    """The lease named ``name`` in ``store`` as seen by one process (``holder``, by default
    :func:`process_identity`). ``seconds``: how long an acquisition or renewal lasts.
    ``clock``: the time in seconds since the epoch (default: the database's); ``monotonic``:
    this process's own clock for its local view of the lease."""

    def __init__(
        self,
        store: Store,
        *,
        seconds: float = DEFAULT_LEASE_SECONDS,
        holder: str | None = None,
        address: str | None = None,
        name: str = LEASE_NAME,
        clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        is_gone: Callable[[str], bool] = holder_gone,
    ) -> None:
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
            raise ConfigError(
                "lease_seconds must be a positive number of seconds",
                field="lease_seconds",
                value=seconds,
                fix=f"use for example {DEFAULT_LEASE_SECONDS:g}",
            )
        self.store = store
        self.seconds = float(seconds)
        self.holder = holder or process_identity()
        self.address = address
        self.name = name
        self._clock = clock
        self._monotonic = monotonic
        self._is_gone = is_gone
        self.token: int | None = None  # the fencing token while this process holds the lease
        self._valid_until = 0.0  # monotonic: when this process stops counting itself leader
        self._lock = threading.Lock()

    # --- reading ---------------------------------------------------------------------------------

    def _now(self, conn: Any) -> float:
        return self._clock() if self._clock is not None else database_now(conn)

    def current(self) -> LeaseInfo | None:
        """The lease row as stored (whoever holds it), or None before anyone took it."""
        with self.store.begin() as conn:
            row = conn.execute(select(leases).where(leases.c.name == self.name)).first()
        return None if row is None else _info(row)

    @property
    def held(self) -> bool:
        """Whether this process holds the lease, by its own monotonic clock (a renewal is due
        well before this turns false)."""
        return self.token is not None and self._monotonic() < self._valid_until

    def require_leader(self) -> None:
        """Raise :class:`NotLeaderError` (503) naming the leader's address unless this process
        holds the lease."""
        if self.held:
            return
        info = self.current()
        address = info.address if info is not None else None
        raise NotLeaderError(
            "this coordinator is a standby: only the leader starts jobs",
            field="leader",
            value=address,
            fix=f"send it to the leader{f' at {address}' if address else ''}, "
            f"or retry in a few seconds (a standby takes over within "
            f"{self.seconds:g} s of the leader's failure)",
            retry_after=min(self.seconds / 3, 5.0),
        )

    # --- acquiring, renewing, releasing ----------------------------------------------------------

    def try_acquire(self) -> bool:
        """Take the lease if it is free, expired, or its holder's process is gone (or renew it
        if this process holds it); True when this process holds it afterwards."""
        started = self._monotonic()
        with self._lock, self.store.writer() as conn:
            if conn.dialect.name == "postgresql":  # a holder paused mid-transaction keeps its
                conn.execute(text("SET LOCAL lock_timeout = '5s'"))  # row lock: look again later
            row = conn.execute(
                select(leases).where(leases.c.name == self.name).with_for_update()
            ).first()
            now = self._now(conn)
            values = {
                "holder": self.holder,
                "address": self.address,
                "renewed_at": now,
                "expires_at": now + self.seconds,
            }
            if row is None:
                try:
                    conn.execute(
                        insert(leases).values(
                            name=self.name, token=1, acquired_at=now, fenced_writes=0, **values
                        )
                    )
                    conn.commit()
                except IntegrityError:  # another process inserted it first
                    conn.rollback()
                    return False
                return self._took(1, started, None)
            if row.holder == self.holder and row.token == self.token:
                conn.execute(update(leases).where(leases.c.name == self.name).values(**values))
                conn.commit()
                self._valid_until = started + self.seconds
                return True
            if row.expires_at > now and not self._is_gone(row.holder):
                return False
            token = int(row.token) + 1
            taken = conn.execute(
                update(leases)
                .where(leases.c.name == self.name, leases.c.token == row.token)
                .values(token=token, acquired_at=now, **values)
            ).rowcount
            conn.commit()
        if taken != 1:
            return False
        why = "expired" if row.expires_at <= now else "its holder's process is gone"
        return self._took(token, started, f"from {row.holder} (token {row.token}; {why})")

    def _took(self, token: int, started: float, previous: str | None) -> bool:
        self.token = token
        self._valid_until = started + self.seconds
        log.warning(
            "took the coordinator lease (token %d)%s", token, f" {previous}" if previous else ""
        )
        return True

    def renew(self) -> bool:
        """Push the expiry ``seconds`` ahead; False (and this process no longer holds it) when
        another process took the lease over. A database error propagates: the caller decides
        (the keeper keeps the lease until its local expiry)."""
        if self.token is None:
            return False
        started = self._monotonic()
        with self._lock, self.store.begin() as conn:
            now = self._now(conn)
            changed = conn.execute(
                update(leases)
                .where(
                    leases.c.name == self.name,
                    leases.c.holder == self.holder,
                    leases.c.token == self.token,
                )
                .values(renewed_at=now, expires_at=now + self.seconds, address=self.address)
            ).rowcount
        if changed != 1:
            log.warning(
                "lost the coordinator lease (token %s): another coordinator holds it", self.token
            )
            self.token = None
            return False
        self._valid_until = started + self.seconds
        return True

    def release(self) -> None:
        """Give the lease up at once (a graceful stop): a standby may take it at its next look,
        with the next token."""
        token, self.token = self.token, None
        if token is None:
            return
        with self._lock, self.store.begin() as conn:
            now = self._now(conn)
            conn.execute(
                update(leases)
                .where(
                    leases.c.name == self.name,
                    leases.c.holder == self.holder,
                    leases.c.token == token,
                )
                .values(expires_at=now)
            )

    def drop(self) -> None:
        """Stop counting this process as the holder without touching the row (local expiry)."""
        self.token = None

    # --- fencing ---------------------------------------------------------------------------------

    def fence(self, conn: Any) -> None:
        """Inside the caller's write transaction: raise :class:`LeaseLostError` unless the lease
        row still names this process and its token. Updating the row (``fenced_writes``) locks
        it, so a takeover waits for this transaction or makes it fail."""
        token = self.token
        changed = 0
        if token is not None:
            changed = conn.execute(
                update(leases)
                .where(
                    leases.c.name == self.name,
                    leases.c.holder == self.holder,
                    leases.c.token == token,
                )
                .values(fenced_writes=leases.c.fenced_writes + 1)
            ).rowcount
        if changed != 1:
            log.warning(
                "refused a commit: this coordinator no longer holds the lease (token %s)", token
            )
            raise LeaseLostError(
                "this coordinator lost the leader lease; the commit was refused and the job "
                "goes on under the new leader",
                field="lease.token",
                value=token,
                fix="nothing to do: the leader resumes the job from its last committed round",
            )


def _info(row: Any) -> LeaseInfo:
    return LeaseInfo(
        name=row.name,
        holder=row.holder,
        address=row.address,
        token=int(row.token),
        acquired_at=float(row.acquired_at),
        expires_at=float(row.expires_at),
    )


# --- the loop --------------------------------------------------------------------------------------


class LeaseKeeper:
    """Keeps one process's lease: a standby tries to acquire it every ``poll_seconds`` (default
    the smaller of 1 s and a third of the lease), the leader renews it every third of the lease.
    ``on_acquired()`` runs when this process becomes the leader, ``on_lost()`` when it stops
    being it (taken over, or not renewed in time because the database was unreachable)."""

    def __init__(
        self,
        lease: LeaderLease,
        *,
        on_acquired: Callable[[], None],
        on_lost: Callable[[], None],
        poll_seconds: float | None = None,
    ) -> None:
        self.lease = lease
        self.on_acquired = on_acquired
        self.on_lost = on_lost
        self.renew_seconds = lease.seconds / 3
        self.poll_seconds = poll_seconds or min(1.0, self.renew_seconds)
        self.leading = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> bool:
        """One look at the lease (acquire, or renew); returns whether this process leads."""
        if self.leading:
            try:
                kept = self.lease.renew()
            except StoreError as exc:  # unreachable: still ours until the local expiry
                log.warning("cannot renew the coordinator lease: %s", exc)
                kept = self.lease.held
                if not kept:
                    self.lease.drop()
            if not kept:
                self.leading = False
                self.on_lost()
            return self.leading
        try:
            acquired = self.lease.try_acquire()
        except StoreError as exc:
            log.warning("cannot reach the coordinator lease: %s", exc)
            return False
        if acquired:
            self.leading = True
            self.on_acquired()
        return self.leading

    def start(self) -> LeaseKeeper:
        """Take a first look now (a restarted leader leads before it serves), then loop on a
        daemon thread."""
        self.step()
        self._thread = threading.Thread(target=self._loop, name="coordinator-lease", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.renew_seconds if self.leading else self.poll_seconds):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad look
                log.exception("coordinator lease loop")

    def stop(self, *, release: bool = True) -> None:
        """Stop the loop; with ``release`` give the lease up (a standby takes over at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if release and self.leading:
            self.leading = False
            try:
                self.lease.release()
            except StoreError as exc:
                log.warning("cannot release the coordinator lease: %s", exc)


def _end_stalled_sessions(store: Store, seconds: float) -> None:
    """Have PostgreSQL end this process's sessions that sit idle inside a transaction for
    ``seconds``: a coordinator paused mid-transaction (SIGSTOP, a VM freeze) would otherwise hold
    its row locks, and the standby's takeover would wait for it forever. Pooled connections are
    replaced so that every session gets the setting."""
    milliseconds = int(seconds * 1000)

    def configure(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(f"SET idle_in_transaction_session_timeout = {milliseconds}")
        cursor.close()
        dbapi_conn.commit()

    event.listen(store.engine, "connect", configure)
    store.engine.dispose()


def lead_with_lease(
    coordinator: Any, lease: LeaderLease, *, start: bool = True, **keeper_options: Any
) -> LeaseKeeper:
    """Run ``coordinator`` (a :class:`.service.Coordinator` opened with ``recover=False``) under
    ``lease``: its state's commits are fenced; when it takes the lease it resumes the jobs a
    previous leader left (:meth:`.jobs.JobRunner.recover`, in a fresh runner); when it loses it,
    its job threads stop and it serves on as a standby. Returns the started keeper (it has
    taken a first look; ``start=False``: not started, drive it with :meth:`LeaseKeeper.step`)."""
    from .jobs import JobRunner

    coordinator.state.fence = lease.fence
    coordinator.lease = lease
    if lease.store.dialect == "postgresql":
        _end_stalled_sessions(lease.store, max(lease.seconds, 5.0))

    def acquired() -> None:
        old = coordinator.runner
        if old.stop.is_set() or old.running():
            coordinator.runner = JobRunner(old.state, registry=old.registry, pm=old.pm)
        resumed = coordinator.runner.recover()
        if resumed:
            log.warning("leader: resuming %d job(s): %s", len(resumed), resumed)

    def lost() -> None:
        log.warning("no longer the leader: stopping this coordinator's job threads")
        coordinator.runner.stop_jobs()

    keeper = LeaseKeeper(lease, on_acquired=acquired, on_lost=lost, **keeper_options)
    return keeper.start() if start else keeper
