"""Runs, cursors, links, intents, outcomes, flags and audit events, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
import sqlalchemy as sa

from connectors.domain import Invoice, InvoiceLine
from connectors.interfaces import Cursor
from sync.state import (
    AuditData,
    Confirmed,
    Failed,
    IntentData,
    LinkData,
    StateError,
    StateStore,
)

P = "hubspot-to-xero"
UTC = dt.UTC


def intent(crm_id: str, revision: int = 1, *, pipeline: str = P, kind: str = "invoice") -> IntentData:
    return IntentData(
        pipeline=pipeline,
        kind=kind,
        crm_id=crm_id,
        revision=revision,
        idempotency_key=f"key-{pipeline}-{kind}-{crm_id}-v{revision}",
        reference=f"LB-{crm_id}",
        request_fingerprint=f"fp-{crm_id}-{revision}",
    )


def confirmed(i: IntentData, ledger_id: str | None = None) -> Confirmed:
    return Confirmed(
        key=i.idempotency_key,
        crm_id=i.crm_id,
        ledger_id=f"inv-{i.crm_id}" if ledger_id is None else ledger_id,
        ledger_number=f"INV-{i.crm_id}",
        reference=i.reference,
        fingerprint=i.request_fingerprint,
        revision=i.revision,
    )


# ---- runs ----------------------------------------------------------------------------------------


def test_runs_record_start_finish_and_counters(store: StateStore) -> None:
    """A run goes from running to its final status with counts, API calls, error and who ran it."""
    first = store.start_run(P)
    second = store.start_run("other")
    running = store.recent_runs(pipeline=P)
    assert [r.status for r in running] == ["running"]
    assert running[0].pid is not None
    assert running[0].host
    store.finish_run(first, "partial", {"invoices": 3, "flagged": 1}, {"hubspot": 12, "xero": 4}, "1 invoice rejected")
    (row,) = store.recent_runs(pipeline=P)
    assert row.id == first
    assert row.status == "partial"
    assert row.counts == {"invoices": 3, "flagged": 1}
    assert row.api_calls == {"hubspot": 12, "xero": 4}
    assert row.error == "1 invoice rejected"
    assert row.finished_at is not None
    assert row.finished_at >= row.started_at
    assert row.started_at.tzinfo == UTC
    assert [r.id for r in store.recent_runs()] == [second, first]
    assert len(store.recent_runs(limit=1)) == 1
    with pytest.raises(ValueError, match="run status"):
        store.finish_run(second, "done", {}, {})
    with pytest.raises(StateError):
        store.finish_run("no-such-run", "ok", {}, {})


# ---- cursors -------------------------------------------------------------------------------------


def test_cursor_round_trip_keeps_aware_utc_microseconds(store: StateStore) -> None:
    """A cursor comes back tz-aware in UTC, to the microsecond, whatever offset it was given in."""
    assert store.get_cursor(P, "deals") is None
    utc_value = Cursor(dt.datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC), "D000042")
    store.set_cursor(P, "deals", utc_value)
    got = store.get_cursor(P, "deals")
    assert got == utc_value
    assert got is not None
    assert got.value.tzinfo == UTC
    assert got.value.microsecond == 999_999

    paris = dt.timezone(dt.timedelta(hours=2))
    local = Cursor(dt.datetime(2024, 6, 1, 2, 30, 0, 123_456, tzinfo=paris), "D7")
    store.set_cursor(P, "deals", local)
    got = store.get_cursor(P, "deals")
    assert got is not None
    assert got.value == local.value
    assert got.value.utcoffset() == dt.timedelta(0)
    assert (got.value.hour, got.value.microsecond, got.tiebreak) == (0, 123_456, "D7")
    assert store.get_cursor(P, "payments") is None


def test_naive_cursor_is_refused(store: StateStore) -> None:
    """A naive datetime cannot become a cursor (its time zone would be a guess)."""
    with pytest.raises(ValueError, match="timezone-aware"):
        store.set_cursor(P, "deals", Cursor(dt.datetime(2024, 1, 1, 12, 0), "x"))
    assert store.get_cursor(P, "deals") is None


# ---- links ---------------------------------------------------------------------------------------


def test_save_links_upserts_by_crm_id(store: StateStore) -> None:
    """save_links inserts new links and updates existing ones in place, keeping creation time and id."""
    assert not store.has_any_state(P)
    store.save_links(P, "customer", [LinkData("C1", "xc-1", "CUST-1"), LinkData("C2", "xc-2")])
    assert store.has_any_state(P)
    first = store.links(P, "customer")
    store.save_links(P, "customer", [LinkData("C1", "xc-9", "CUST-9", reference="r", fingerprint="f", revision=2)])
    after = store.links(P, "customer", ["C1", "C3"])
    assert set(after) == {"C1"}
    c1 = after["C1"]
    assert (c1.ledger_id, c1.ledger_number, c1.reference, c1.fingerprint, c1.revision) == (
        "xc-9",
        "CUST-9",
        "r",
        "f",
        2,
    )
    assert c1.id == first["C1"].id
    assert c1.created_at == first["C1"].created_at
    assert c1.updated_at >= first["C1"].updated_at
    assert store.links(P, "deal") == {}
    assert store.links("other", "customer") == {}
    with pytest.raises(ValueError, match="link kind"):
        store.links(P, "invoice")


def test_links_lookup_handles_many_ids(store: StateStore) -> None:
    """Looking up more CRM ids than fit one IN clause returns every link."""
    store.save_links(P, "deal", [LinkData(f"D{n}", f"L{n}") for n in range(1_200)])
    found = store.links(P, "deal", (f"D{n}" for n in range(0, 1_300)))
    assert len(found) == 1_200
    assert found["D1199"].ledger_id == "L1199"


# ---- intents -------------------------------------------------------------------------------------


def test_add_intents_is_idempotent(store: StateStore) -> None:
    """Adding the same intents again returns the stored rows unchanged and adds no row."""
    rows = [intent("D1"), intent("D2"), intent("D2", 2)]
    first = store.add_intents(rows)
    assert [r.state for r in first] == ["pending"] * 3
    assert [r.idempotency_key for r in first] == [r.idempotency_key for r in rows]
    store.mark_intents([rows[0].idempotency_key], "sent")

    again = store.add_intents([*rows, intent("D3")])
    assert [r.id for r in again[:3]] == [r.id for r in first]
    assert (again[0].state, again[0].attempts) == ("sent", 1)
    assert again[1] == first[1]
    with store.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM intents")) == 4


def test_add_intents_returns_the_existing_row_for_a_known_revision(store: StateStore) -> None:
    """An intent for a known (pipeline, kind, crm_id, revision) keeps its first key and fingerprint."""
    (orig,) = store.add_intents([intent("D1")])
    changed = IntentData(P, "invoice", "D1", 1, "another-key", "LB-D1", "other-fp")
    (got,) = store.add_intents([changed])
    assert got == orig


def test_add_intents_refuses_a_key_used_by_another_intent(store: StateStore) -> None:
    """A key clash with another deal's intent raises and leaves no row of the batch behind."""
    store.add_intents([intent("D1")])
    clash = IntentData(P, "invoice", "D2", 1, intent("D1").idempotency_key, "LB-D2", "fp")
    with pytest.raises(StateError, match="already used"):
        store.add_intents([intent("D3"), clash])
    assert set(store.intents_for(P, "invoice", ["D1", "D2", "D3"])) == {"D1"}


def test_intents_for_returns_the_latest_revision(store: StateStore) -> None:
    """intents_for gives each CRM id's highest revision, per pipeline and kind."""
    store.add_intents(
        [intent("D1", 1), intent("D1", 3), intent("D1", 2), intent("D2"), intent("D1", 9, kind="customer")]
    )
    got = store.intents_for(P, "invoice", ["D1", "D2", "D9"])
    assert {k: v.revision for k, v in got.items()} == {"D1": 3, "D2": 1}
    assert store.intents_for("other", "invoice", ["D1"]) == {}


def test_mark_intents_counts_attempts_and_lists_open_intents(store: StateStore) -> None:
    """Marking 'sent' counts an attempt; open_intents lists pending and sent ones, oldest first."""
    a, b, c = intent("D1"), intent("D2"), intent("D3")
    store.add_intents([a, b, c])
    store.mark_intents([a.idempotency_key], "sent")
    store.mark_intents([a.idempotency_key, b.idempotency_key], "sent")
    store.mark_intents([c.idempotency_key], "failed", "ValidationError: TaxType")
    rows = {r.crm_id: r for r in store.open_intents(P, "invoice")}
    assert {k: (r.state, r.attempts) for k, r in rows.items()} == {"D1": ("sent", 2), "D2": ("sent", 1)}
    (failed,) = store.open_intents(P, "invoice", states=("failed",))
    assert failed.error == "ValidationError: TaxType"
    assert failed.attempts == 0
    assert store.open_intents(P, "customer") == []
    with pytest.raises(StateError, match="unknown"):
        store.mark_intents(["nope", a.idempotency_key], "sent")
    assert store.intents_for(P, "invoice", ["D1"])["D1"].attempts == 2


# ---- outcomes ------------------------------------------------------------------------------------


def test_record_outcomes_commits_intents_links_audit_and_cursor(store: StateStore) -> None:
    """A batch outcome confirms and fails intents, upserts links, writes audit events and moves the cursor."""
    run = store.start_run(P)
    ok1, ok2, bad = intent("D1"), intent("D2"), intent("D3")
    cust = intent("C1", kind="customer")
    store.add_intents([ok1, ok2, bad, cust])
    store.save_links(P, "deal", [LinkData("D2", "old-inv", "INV-OLD", "LB-D2", "old-fp", 0)])
    cur = Cursor(dt.datetime(2024, 5, 1, 10, 0, 0, 1, tzinfo=UTC), "D3")

    store.record_outcomes(
        P,
        run,
        confirmed=[confirmed(ok1), confirmed(ok2), confirmed(cust, "xc-1")],
        failed=[Failed(bad.idempotency_key, "D3", "ValidationError: unknown ItemCode")],
        cursor=("deals", cur),
        audits=[AuditData("deal.changed_after_invoice", "deal", "D9", "crm", after={"amount": Decimal("10.50")})],
    )

    states = {r.crm_id: (r.state, r.ledger_id, r.error) for r in store.open_intents(P, "invoice", INTENT_ALL)}
    assert states == {
        "D1": ("confirmed", "inv-D1", None),
        "D2": ("confirmed", "inv-D2", None),
        "D3": ("failed", None, "ValidationError: unknown ItemCode"),
    }
    deals = store.links(P, "deal")
    assert {k: (v.ledger_id, v.ledger_number, v.revision) for k, v in deals.items()} == {
        "D1": ("inv-D1", "INV-D1", 1),
        "D2": ("inv-D2", "INV-D2", 1),
    }
    assert store.links(P, "customer")["C1"].ledger_id == "xc-1"
    assert store.get_cursor(P, "deals") == cur

    events = {(e.action, e.object_id): e for e in store.audit_events(P)}
    assert set(events) == {
        ("invoice.created", "D1"),
        ("invoice.created", "D2"),
        ("customer.created", "C1"),
        ("invoice.failed", "D3"),
        ("deal.changed_after_invoice", "D9"),
    }
    assert all(e.run_id == run for e in events.values())
    created = events[("invoice.created", "D2")]
    assert created.location == "ledger"
    assert created.object_kind == "deal"
    assert created.before is not None
    assert created.before["ledger_id"] == "old-inv"
    assert created.after is not None
    assert created.after["ledger_id"] == "inv-D2"
    assert events[("invoice.created", "D1")].before is None
    assert events[("deal.changed_after_invoice", "D9")].after == {"amount": "10.50"}


INTENT_ALL = ("pending", "sent", "confirmed", "failed")


@pytest.mark.parametrize("poison", ["empty_ledger_id", "naive_cursor", "unknown_key", "wrong_revision"])
def test_record_outcomes_is_all_or_nothing(store: StateStore, poison: str) -> None:
    """When any part of a batch fails, no intent state, link, audit event or cursor of it is written."""
    run = store.start_run(P)
    a, b, c = intent("D1"), intent("D2"), intent("D3")
    store.add_intents([a, b, c])
    store.mark_intents([a.idempotency_key, b.idempotency_key, c.idempotency_key], "sent")
    before_cursor = Cursor(dt.datetime(2024, 1, 1, tzinfo=UTC), "D0")
    store.set_cursor(P, "deals", before_cursor)
    next_cursor = Cursor(dt.datetime(2024, 2, 1, tzinfo=UTC), "D3")
    ok = confirmed(a)
    second = confirmed(b)
    failed = [Failed(c.idempotency_key, "D3", "rejected")]
    expected: type[Exception] = StateError
    if poison == "empty_ledger_id":  # the link of the second invoice violates a CHECK constraint
        second = confirmed(b, ledger_id="")
        expected = sa.exc.IntegrityError
    elif poison == "naive_cursor":  # the very last statement of the transaction fails
        next_cursor = Cursor(dt.datetime(2024, 2, 1), "D3")
        expected = ValueError
    elif poison == "unknown_key":
        failed.append(Failed("no-such-key", "D4", "x"))
    else:
        second = Confirmed(b.idempotency_key, "D2", "inv", None, "LB-D2", "fp", revision=7)

    with pytest.raises(expected):
        store.record_outcomes(
            P,
            run,
            confirmed=[ok, second],
            failed=failed,
            cursor=("deals", next_cursor),
            audits=[AuditData("deal.changed_after_invoice", "deal", "D1", "crm")],
        )

    rows = store.open_intents(P, "invoice", INTENT_ALL)
    assert [(r.state, r.ledger_id, r.error) for r in rows] == [("sent", None, None)] * 3
    assert store.links(P, "deal") == {}
    assert store.get_cursor(P, "deals") == before_cursor
    assert store.audit_events(P) == []


# ---- flags ---------------------------------------------------------------------------------------


def test_flags_open_refresh_resolve_and_reopen(store: StateStore) -> None:
    """A flag is opened once, refreshed on each re-check, resolved, and reopened as a new episode."""
    run = store.start_run(P)
    store.flag(P, run, "D1", "unmapped_item", "SKU-9 has no ledger item")
    store.flag(P, run, "D2", "missing_customer", "no company")
    first = store.open_flags(P)["D1"]
    store.flag(P, run, "D1", "unmapped_item", "SKU-9 has no ledger item")
    again = store.open_flags(P)["D1"]
    assert again.first_seen == first.first_seen
    assert again.last_seen >= first.last_seen
    assert [e.action for e in store.audit_events(P)] == ["deal.flagged", "deal.flagged"]

    store.flag(P, run, "D1", "unmapped_tax", "rate 7 %")
    assert store.open_flags(P)["D1"].reason == "unmapped_tax"
    latest = store.audit_events(P, limit=1)[0]
    assert latest.before == {"reason": "unmapped_item", "detail": "SKU-9 has no ledger item"}

    store.resolve_flags(P, ["D1", "D404"])
    assert set(store.open_flags(P)) == {"D2"}
    assert store.audit_events(P, limit=1)[0].action == "deal.flag_resolved"
    store.flag(P, run, "D1", "unmapped_item", "again")
    reopened = store.open_flags(P)["D1"]
    assert reopened.resolved_at is None
    assert reopened.first_seen > first.first_seen
    assert store.open_flags("other") == {}


# ---- audit and JSON ------------------------------------------------------------------------------


def test_audit_json_takes_decimals_dates_and_models_as_strings(store: StateStore) -> None:
    """Audit payloads store Decimal, date, datetime and pydantic values as JSON strings, never floats."""
    inv = Invoice(
        reference="LB-D1",
        currency="EUR",
        issue_date=dt.date(2024, 3, 1),
        lines=[InvoiceLine(description="Audit", quantity=Decimal("1.5"), unit_price=Decimal("100.10"))],
    )
    when = dt.datetime(2024, 3, 1, 8, 0, 0, 5, tzinfo=UTC)
    store.audit(
        [
            AuditData(
                "invoice.created",
                "deal",
                "D1",
                "ledger",
                before={"amount": Decimal("150.15"), "on": dt.date(2024, 3, 1), "at": when},
                after={"invoice": inv, "tags": ("a", "b")},
                pipeline=P,
                at=when,
            )
        ]
    )
    (row,) = store.audit_events()
    assert row.at == when
    assert row.run_id is None
    assert row.before == {"amount": "150.15", "on": "2024-03-01", "at": "2024-03-01T08:00:00.000005+00:00"}
    assert row.after is not None
    assert row.after["invoice"]["lines"][0]["unit_price"] == "100.10"
    assert row.after["tags"] == ["a", "b"]
    with store.engine.connect() as conn:
        raw = conn.scalar(sa.text("SELECT CAST(before AS TEXT) FROM audit_events"))
    assert '"150.15"' in raw


def test_audit_refuses_floats_and_events_without_pipeline(store: StateStore) -> None:
    """A float in a JSON payload or an event without a pipeline is refused and nothing is written."""
    with pytest.raises(TypeError, match="float"):
        store.audit([AuditData("x", "deal", "D1", "state", after={"amount": 1.1}, pipeline=P)])
    with pytest.raises(ValueError, match="pipeline"):
        store.audit([AuditData("x", "deal", "D1", "state", pipeline=P), AuditData("y", "deal", "D2", "state")])
    with pytest.raises(ValueError, match="location"):
        store.audit([AuditData("x", "deal", "D1", "mars", pipeline=P)])
    assert store.audit_events() == []


def test_audit_events_are_newest_first_and_filtered(store: StateStore) -> None:
    """audit_events returns the newest events first, by pipeline, up to the limit."""
    store.audit([AuditData(f"a{n}", "deal", f"D{n}", "state", pipeline=P if n % 2 else "other") for n in range(6)])
    assert [e.action for e in store.audit_events(P)] == ["a5", "a3", "a1"]
    assert [e.action for e in store.audit_events(limit=2)] == ["a5", "a4"]


def test_a_confirmed_intent_cannot_fall_back(store: StateStore) -> None:
    """Once confirmed, an intent can be neither marked pending/sent/failed nor recorded as failed."""
    run = store.start_run(P)
    a, b = intent("D1"), intent("D2")
    store.add_intents([a, b])
    store.record_outcomes(P, run, confirmed=[confirmed(a)], failed=[])
    with pytest.raises(StateError, match="already confirmed"):
        store.mark_intents([b.idempotency_key, a.idempotency_key], "sent")
    with pytest.raises(StateError, match="already confirmed"):
        store.record_outcomes(P, run, confirmed=[], failed=[Failed(a.idempotency_key, "D1", "late error")])
    with pytest.raises(StateError, match="more than once"):
        store.record_outcomes(
            P, run, confirmed=[confirmed(b)], failed=[Failed(b.idempotency_key, "D2", "both")]
        )
    rows = {r.crm_id: r for r in store.open_intents(P, "invoice", INTENT_ALL)}
    assert (rows["D1"].state, rows["D1"].ledger_id) == ("confirmed", "inv-D1")
    assert (rows["D2"].state, rows["D2"].attempts) == ("pending", 0)
    store.record_outcomes(P, run, confirmed=[confirmed(a, "inv-D1")], failed=[])  # re-confirming is harmless
    assert store.links(P, "deal")["D1"].ledger_id == "inv-D1"


def test_caller_audit_events_replace_the_stores_own_for_the_same_object(store: StateStore) -> None:
    """An outcome the caller describes with its own audit event is not logged a second time by the store."""
    run = store.start_run(P)
    a, b = intent("D1"), intent("D2")
    store.add_intents([a, b])
    store.record_outcomes(
        P,
        run,
        confirmed=[confirmed(a)],
        failed=[Failed(b.idempotency_key, "D2", "rejected")],
        audits=[
            AuditData("intent.adopted", "deal", "D1", "ledger", before={"state": "sent"}),
            AuditData("invoice.rejected", "deal", "D2", "ledger", after={"error": "rejected"}),
        ],
    )
    assert sorted((e.action, e.object_id) for e in store.audit_events(P)) == [
        ("intent.adopted", "D1"),
        ("invoice.rejected", "D2"),
    ]


def test_link_data_kind_must_match_the_saved_kind(store: StateStore) -> None:
    """A LinkData that names its kind is saved only under that kind."""
    store.save_links(P, "customer", [LinkData(kind="customer", crm_id="C1", ledger_id="x1")])
    assert set(store.links(P, "customer")) == {"C1"}
    with pytest.raises(ValueError, match="'deal' link"):
        store.save_links(P, "customer", [LinkData(kind="deal", crm_id="D1", ledger_id="x2")])
