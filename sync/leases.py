"""Job leases: each (pipeline, job) runs on one replica at a time, and a dead replica's work moves on.

A lease is a row of ``job_leases`` named ``"<pipeline>:<job>"``: the replica that owns it, a fencing token
that grows by one on every acquisition, when it was acquired and when it expires. It is taken with one
statement, ``INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE <the lease is free> RETURNING``: the row
lock that statement takes makes concurrent takers queue, and exactly one of them sees the lease free.
A lease is free when it expired (``expires_at <= now``) or was released; a lease its owner holds is not free
to that owner either (two jobs of one replica exclude each other like two replicas do).

While a job runs, a heartbeat thread renews its lease every third of the lease time; when the job ends the
lease is released (its expiry set to now, its token kept, so tokens never go back). A replica that dies
(SIGKILL, lost host) stops renewing, and its leases fall free within ``lease_s``.

PostgreSQL's clock (``now()``) decides expiry, so replicas on hosts whose clocks disagree still agree on
who holds what. SQLite (one daemon at a time, see :mod:`sync.daemon`) uses the local clock; the same code
runs on both.

A lease makes double work unlikely; it cannot make it impossible (a replica frozen longer than ``lease_s``
wakes up still running its job). Correctness does not rest on it: every ledger write carries an idempotency
key committed beforehand, and the state's unique constraints refuse a second link. A heartbeat that finds
its lease taken over reports it (:attr:`HeldLease.lost`) and logs an error.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from connectors.errors import redact
from sync.state import JOB_LEASES, StateStore, UTCDateTime

__all__ = ["DEFAULT_LEASE_S", "HeldLease", "Lease", "LeaseRow", "Leases", "replica_id"]

log = structlog.get_logger("ledgerbridge.leases")

DEFAULT_LEASE_S = 30.0
"""How long a lease lasts without renewal: the longest a dead replica keeps its work."""


def replica_id() -> str:
    """This process's identity as a lease owner: ``host:pid:random`` (unique even when pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclasses.dataclass(frozen=True)
class Lease:
    """A lease this replica holds. ``token`` is its fencing token (larger than any earlier holder's)."""

    name: str
    owner: str
    token: int
    expires_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class LeaseRow:
    """A lease as the database holds it (whoever owns it)."""

    name: str
    owner: str
    token: int
    acquired_at: dt.datetime
    expires_at: dt.datetime


class Leases:
    """Takes, renews and releases the leases of one owner (one daemon replica) in a state store."""

    def __init__(self, store: StateStore, owner: str | None = None, lease_s: float = DEFAULT_LEASE_S) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.store = store
        self.owner = owner or replica_id()
        self.lease_s = float(lease_s)
        self._pg = store.dialect == "postgresql"

    # ---- clock --------------------------------------------------------------------------------------

    def _now(self) -> Any:
        """The database's clock on PostgreSQL (the same for every replica); the local clock on SQLite."""
        if self._pg:
            return sa.func.now()
        return sa.literal(dt.datetime.now(dt.UTC), UTCDateTime)

    def _shift(self, now: Any, seconds: float) -> Any:
        if self._pg:
            return now + sa.literal(dt.timedelta(seconds=seconds), sa.Interval())
        return sa.literal(now.value + dt.timedelta(seconds=seconds), UTCDateTime)

    # ---- operations ---------------------------------------------------------------------------------

    def try_acquire(self, name: str, *, min_gap_s: float = 0.0) -> Lease | None:
        """Take the lease ``name`` if it is free; None when another replica holds it.

        ``min_gap_s`` > 0 also refuses a lease acquired less than that many seconds ago (by anyone): the
        replicas' schedules then run a job once per period between them, rather than once each.
        """
        t = JOB_LEASES
        now = self._now()
        expires = self._shift(now, self.lease_s)
        insert = (postgresql.insert(t) if self._pg else sqlite.insert(t)).values(
            name=name, owner=self.owner, token=1, acquired_at=now, expires_at=expires
        )
        free = t.c.expires_at <= now
        if min_gap_s > 0:
            free = sa.and_(free, t.c.acquired_at <= self._shift(now, -min_gap_s))
        stmt = insert.on_conflict_do_update(
            index_elements=[t.c.name],
            set_={
                "owner": insert.excluded.owner,
                "token": t.c.token + 1,
                "acquired_at": insert.excluded.acquired_at,
                "expires_at": insert.excluded.expires_at,
            },
            where=free,
        ).returning(t.c.token, t.c.expires_at)
        with self.store.engine.begin() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return None
        return Lease(name=name, owner=self.owner, token=int(row.token), expires_at=row.expires_at)

    def renew(self, lease: Lease) -> Lease | None:
        """Push the lease's expiry ``lease_s`` from now; None when it is no longer ours (taken over)."""
        t = JOB_LEASES
        now = self._now()
        stmt = (
            t.update()
            .where(t.c.name == lease.name, t.c.owner == lease.owner, t.c.token == lease.token)
            .values(expires_at=self._shift(now, self.lease_s))
            .returning(t.c.expires_at)
        )
        with self.store.engine.begin() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else dataclasses.replace(lease, expires_at=row.expires_at)

    def release(self, lease: Lease) -> bool:
        """Free the lease at once (if it is still ours); the fencing token stays for the next holder."""
        t = JOB_LEASES
        stmt = (
            t.update()
            .where(t.c.name == lease.name, t.c.owner == lease.owner, t.c.token == lease.token)
            .values(expires_at=self._now())
        )
        with self.store.engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def row(self, name: str) -> LeaseRow | None:
        """The lease ``name`` as stored (for diagnostics and tests)."""
        with self.store.engine.connect() as conn:
            m = conn.execute(sa.select(JOB_LEASES).where(JOB_LEASES.c.name == name)).mappings().first()
        if m is None:
            return None
        return LeaseRow(name=m["name"], owner=m["owner"], token=int(m["token"]), acquired_at=m["acquired_at"],
                        expires_at=m["expires_at"])

    @contextmanager
    def hold(self, name: str, *, min_gap_s: float = 0.0, wait_s: float = 0.0,
             give_up: threading.Event | None = None) -> Iterator[HeldLease | None]:
        """Hold the lease ``name`` for the block, renewed by a heartbeat; yields None when it is not free.

        ``wait_s`` > 0 tries again (every quarter second) for that long before giving up, or until
        ``give_up`` is set. The lease is released when the block ends, normally or by an exception.
        """
        deadline = time.monotonic() + wait_s
        lease = self.try_acquire(name, min_gap_s=min_gap_s)
        while lease is None and time.monotonic() < deadline and not (give_up is not None and give_up.is_set()):
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0.0)))
            lease = self.try_acquire(name, min_gap_s=min_gap_s)
        if lease is None:
            yield None
            return
        held = HeldLease(self, lease)
        held.start()
        try:
            yield held
        finally:
            held.stop()


class HeldLease:
    """A lease kept alive by a heartbeat thread while its job runs."""

    def __init__(self, leases: Leases, lease: Lease) -> None:
        self._leases = leases
        self.lease = lease
        self.lost = threading.Event()
        self._stop = threading.Event()
        # The local deadline: the lease lasts lease_s from the moment the statement that set it was sent
        # (the database's expiry is that or later), so this is never later than the real one.
        self._deadline = time.monotonic() + leases.lease_s
        self._thread = threading.Thread(target=self._beat, name=f"lease-{lease.name}", daemon=True)

    @property
    def token(self) -> int:
        return self.lease.token

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and release the lease (a failed release only means it expires on its own)."""
        self._stop.set()
        self._thread.join()
        if self.lost.is_set():
            return
        try:
            self._leases.release(self.lease)
        except SQLAlchemyError as exc:
            log.warning("could not release a lease; it expires on its own", lease=self.lease.name,
                        expires_in_s=round(self._deadline - time.monotonic(), 1),
                        error=f"{type(exc).__name__}: {redact(str(exc), limit=200)}")

    def _beat(self) -> None:
        every = self._leases.lease_s / 3
        wait = every
        while not self._stop.wait(wait):
            sent = time.monotonic()
            try:
                renewed = self._leases.renew(self.lease)
            except SQLAlchemyError as exc:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self._lose("the state store could not be reached to renew it before it expired")
                    return
                log.warning("could not renew a lease; retrying", lease=self.lease.name, expires_in_s=round(left, 1),
                            error=f"{type(exc).__name__}: {redact(str(exc), limit=200)}")
                wait = min(every, max(left / 4, 0.05))
                continue
            if renewed is None:
                self._lose("another replica holds it now")
                return
            self.lease = renewed
            self._deadline = sent + self._leases.lease_s
            wait = every

    def _lose(self, why: str) -> None:
        self.lost.set()
        log.error("lease lost while its job runs: another replica may run the job too (idempotency keys keep "
                  "ledger writes single)", lease=self.lease.name, fence=self.lease.token, reason=why)
