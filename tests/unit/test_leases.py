"""Job leases on SQLite and PostgreSQL: one holder at a time, fencing tokens, expiry, heartbeats, takeovers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from sync.leases import Leases, replica_id
from sync.state import JOB_LEASES, StateStore
from tests.harness import wait_until
from tests.state.conftest import db_url, secret_key

__all__ = ["db_url", "secret_key"]  # fixtures of tests/state, used here too


@pytest.fixture
def store(db_url: str, secret_key: str) -> Iterator[StateStore]:
    s = StateStore.open(db_url, secret_key=secret_key)
    try:
        yield s
    finally:
        s.close()


def _expire(store: StateStore, name: str) -> None:
    """Make the lease ``name`` look expired (its holder stopped renewing long ago)."""
    with store.engine.begin() as conn:
        conn.execute(JOB_LEASES.update().where(JOB_LEASES.c.name == name)
                     .values(expires_at=JOB_LEASES.c.acquired_at))


def test_replica_ids_name_host_and_pid_and_differ() -> None:
    import os
    import socket

    a, b = replica_id(), replica_id()
    assert a != b
    host, pid, tail = a.rsplit(":", 2)
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert len(tail) == 8


def test_one_holder_at_a_time_and_each_acquisition_has_a_larger_token(store: StateStore) -> None:
    a, b = Leases(store, "a", 30), Leases(store, "b", 30)
    first = a.try_acquire("p:sync")
    assert first is not None
    assert first.token == 1
    assert b.try_acquire("p:sync") is None
    assert a.try_acquire("p:sync") is None  # not even its holder takes it twice (two jobs of one replica)
    assert b.try_acquire("p:ledger") is not None  # other jobs are other leases

    assert a.release(first)
    second = b.try_acquire("p:sync")
    assert second is not None
    assert second.token == 2
    assert not a.release(first)  # no longer a's to release
    assert a.renew(first) is None
    row = a.row("p:sync")
    assert row is not None
    assert (row.owner, row.token) == ("b", 2)


def test_a_lease_not_renewed_falls_free_after_its_time_and_not_before(store: StateStore) -> None:
    dead, live = Leases(store, "dead", 1.0), Leases(store, "live", 1.0)
    taken = dead.try_acquire("p:sync")  # and then its holder dies: nothing renews it
    assert taken is not None
    row = dead.row("p:sync")
    assert row is not None
    assert (row.expires_at - row.acquired_at).total_seconds() == pytest.approx(1.0, abs=0.002)
    assert live.try_acquire("p:sync") is None
    time.sleep(0.5)
    assert live.try_acquire("p:sync") is None
    assert wait_until(lambda: live.try_acquire("p:sync") is not None, timeout=2, interval=0.05)
    row = live.row("p:sync")
    assert row is not None
    assert (row.owner, row.token) == ("live", 2)


def test_renewal_pushes_the_expiry_from_now(store: StateStore) -> None:
    a = Leases(store, "a", 1.0)
    lease = a.try_acquire("p:sync")
    assert lease is not None
    time.sleep(0.3)
    renewed = a.renew(lease)
    assert renewed is not None
    assert renewed.token == lease.token
    assert (renewed.expires_at - lease.expires_at).total_seconds() == pytest.approx(0.3, abs=0.15)


def test_min_gap_refuses_a_lease_acquired_recently_even_when_free(store: StateStore) -> None:
    a, b = Leases(store, "a", 30), Leases(store, "b", 30)
    lease = a.try_acquire("p:sync")
    assert lease is not None
    a.release(lease)
    assert b.try_acquire("p:sync", min_gap_s=60) is None  # a ran it a moment ago
    _backdate(store, "p:sync", 120)  # now two minutes ago
    assert b.try_acquire("p:sync", min_gap_s=60) is not None


def _backdate(store: StateStore, name: str, seconds: float) -> None:
    import datetime as dt

    row = Leases(store).row(name)
    assert row is not None
    past = row.acquired_at - dt.timedelta(seconds=seconds)
    with store.engine.begin() as conn:
        conn.execute(JOB_LEASES.update().where(JOB_LEASES.c.name == name).values(acquired_at=past, expires_at=past))


def test_racing_replicas_elect_exactly_one_holder(store: StateStore, db_url: str, secret_key: str) -> None:
    """Eight replicas (each its own connection pool) try the same lease at once, twenty times over."""
    stores = [store] + [StateStore(db_url, secret_key=secret_key) for _ in range(3)]
    try:
        replicas = [Leases(stores[i % len(stores)], f"r{i}", 30) for i in range(8)]
        for round_ in range(20):
            name = f"p:race{round_}"
            barrier = threading.Barrier(len(replicas))
            won: list[str] = []

            def race(leases: Leases, name: str = name, barrier: threading.Barrier = barrier,
                     won: list[str] = won) -> None:
                barrier.wait()
                if leases.try_acquire(name) is not None:
                    won.append(leases.owner)

            threads = [threading.Thread(target=race, args=(r,)) for r in replicas]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(won) == 1, (round_, won)
            row = replicas[0].row(name)
            assert row is not None
            assert (row.owner, row.token) == (won[0], 1)
    finally:
        for s in stores[1:]:
            s.close()


def test_a_held_lease_is_renewed_while_its_job_runs_and_released_after(store: StateStore) -> None:
    holder, other = Leases(store, "holder", 0.6), Leases(store, "other", 0.6)
    with holder.hold("p:sync") as held:
        assert held is not None
        deadline = time.monotonic() + 1.8  # three lease times
        while time.monotonic() < deadline:
            assert other.try_acquire("p:sync") is None
            time.sleep(0.1)
        assert not held.lost.is_set()
    taken = other.try_acquire("p:sync")
    assert taken is not None
    assert taken.token == 2
    with holder.hold("p:sync") as refused:
        assert refused is None


def test_hold_waits_for_a_lease_when_asked(store: StateStore) -> None:
    a, b = Leases(store, "a", 30), Leases(store, "b", 30)
    lease = a.try_acquire("p:ledger")
    assert lease is not None
    threading.Timer(0.4, a.release, args=(lease,)).start()
    start = time.monotonic()
    with b.hold("p:ledger", wait_s=5) as held:
        assert held is not None
        assert 0.3 < time.monotonic() - start < 3
    give_up = threading.Event()
    give_up.set()
    taken = a.try_acquire("p:ledger")
    assert taken is not None
    start = time.monotonic()
    with b.hold("p:ledger", wait_s=5, give_up=give_up) as held:
        assert held is None
    assert time.monotonic() - start < 1


def test_a_heartbeat_that_finds_its_lease_taken_over_reports_it_and_leaves_it_alone(store: StateStore) -> None:
    holder, other = Leases(store, "holder", 0.6), Leases(store, "other", 0.6)
    with holder.hold("p:sync") as held:
        assert held is not None
        _expire(store, "p:sync")  # as if the holder had been frozen past its lease
        taken = other.try_acquire("p:sync")
        assert taken is not None
        assert wait_until(held.lost.is_set, timeout=3)
    row = other.row("p:sync")
    assert row is not None
    assert (row.owner, row.token) == ("other", taken.token)  # the old holder's release did not free it
    assert row.expires_at > row.acquired_at
