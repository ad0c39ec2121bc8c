"""The Pennylane sandbox: cursors and filters, error shapes, limits, delayed reference lookups, changelogs."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.pennylane.sandbox import DEMO_API_TOKEN, PennylaneSandbox, sandbox_settings
from connectors.pennylane.settings import PennylaneSettings
from connectors.sandboxkit import FaultPlan
from connectors.xero.testing import ManualClock

API = "https://app.pennylane.com/api/external/v2"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sandbox(clock: ManualClock) -> PennylaneSandbox:
    return PennylaneSandbox(clock=clock, seed=3, requests_per_5s=1000, reference_lookup_delay_s=0)


def client(sandbox: PennylaneSandbox, token: str = DEMO_API_TOKEN) -> httpx.Client:
    return httpx.Client(transport=sandbox.transport(), base_url=API, headers={"Authorization": f"Bearer {token}"})


def flt(*conditions: tuple[str, str, Any]) -> str:
    return json.dumps([{"field": f, "operator": op, "value": v} for f, op, v in conditions])


def new_customer(api: httpx.Client, ref: str, name: str = "Dupont SARL") -> int:
    resp = api.post("/company_customers", json={
        "name": name, "external_reference": ref, "reg_no": "303265045", "vat_number": "FR40303265045",
        "emails": ["compta@dupont.fr"],
        "billing_address": {"address": "1 rue de la Paix", "postal_code": "75002", "city": "Paris",
                            "country_alpha2": "FR"},
    })
    assert resp.status_code == 201, resp.text
    cid: int = resp.json()["id"]
    return cid


def invoice_body(customer_id: int, ref: str, *, draft: bool = False, vat: str = "FR_200",
                 date: str = "2026-01-10") -> dict[str, Any]:
    return {"date": date, "deadline": "2026-02-09", "customer_id": customer_id, "currency": "EUR", "draft": draft,
            "external_reference": ref,
            "invoice_lines": [
                {"label": "Conseil", "raw_currency_unit_price": "850.00", "unit": "jour", "vat_rate": vat,
                 "quantity": 2.5},
                {"label": "Guide", "raw_currency_unit_price": "34.00", "unit": "piece", "vat_rate": "FR_55",
                 "quantity": 3, "discount": {"type": "relative", "value": "12.5"}},
            ]}


def new_invoice(api: httpx.Client, customer_id: int, ref: str, **kw: Any) -> dict[str, Any]:
    resp = api.post("/customer_invoices", json=invoice_body(customer_id, ref, **kw))
    assert resp.status_code == 201, resp.text
    data: dict[str, Any] = resp.json()
    return data


def test_cursor_pages_follow_the_filter_only_when_it_is_resent(sandbox: PennylaneSandbox) -> None:
    """The cursor holds the position only: pages keep the filter when it is sent again, and lose it otherwise."""
    api = client(sandbox)
    a, b = new_customer(api, "CA"), new_customer(api, "CB", "Martin SAS")
    mine = []
    for i in range(5):
        mine.append(new_invoice(api, a, f"A{i}")["id"])
        new_invoice(api, b, f"B{i}")
    params = {"filter": flt(("customer_id", "eq", str(a))), "sort": "id", "limit": "2"}
    first = api.get("/customer_invoices", params=params).json()
    assert first["has_more"] is True
    assert [i["id"] for i in first["items"]] == mine[:2]
    without = api.get("/customer_invoices", params={"sort": "id", "limit": "2", "cursor": first["next_cursor"]})
    assert b in {i["customer"]["id"] for i in without.json()["items"]}  # the filter was not carried
    seen: list[int] = []
    page = first
    while True:
        seen += [i["id"] for i in page["items"]]
        if not page["has_more"]:
            break
        page = api.get("/customer_invoices", params={**params, "cursor": page["next_cursor"]}).json()
    assert seen == mine
    assert page["next_cursor"] is None


def test_an_invalid_cursor_is_a_400(sandbox: PennylaneSandbox) -> None:
    """A cursor that is not one, or that belongs to another sort, answers 400 with a message."""
    api = client(sandbox)
    cid = new_customer(api, "C1")
    for i in range(3):
        new_invoice(api, cid, f"R{i}")
    bad = api.get("/customer_invoices", params={"cursor": "not-a-cursor!"})
    assert bad.status_code == 400
    assert "cursor" in bad.json()["message"].lower()
    cursor = api.get("/customer_invoices", params={"sort": "id", "limit": "1"}).json()["next_cursor"]
    other_sort = api.get("/customer_invoices", params={"sort": "-id", "limit": "1", "cursor": cursor})
    assert other_sort.status_code == 400
    assert api.get("/customer_invoices", params={"limit": "101"}).status_code == 400


def test_filters_are_limited_to_the_documented_fields_and_operators(sandbox: PennylaneSandbox) -> None:
    """external_reference takes only eq on invoices; customers take in (with an array) on it."""
    api = client(sandbox)
    new_customer(api, "C1")
    new_customer(api, "C2", "Martin SAS")
    refused = api.get("/customer_invoices", params={"filter": flt(("external_reference", "in", ["X", "Y"]))})
    assert refused.status_code == 400
    found = api.get("/customers", params={"filter": flt(("external_reference", "in", ["C2", "C9"]))}).json()
    assert [c["external_reference"] for c in found["items"]] == ["C2"]
    not_array = api.get("/customers", params={"filter": flt(("external_reference", "in", "C2"))})
    assert not_array.status_code == 400
    by_siren = api.get("/customers", params={"filter": flt(("reg_no", "eq", "303265045"))}).json()
    assert len(by_siren["items"]) == 2


def test_validation_errors_have_the_documented_shapes(sandbox: PennylaneSandbox) -> None:
    """Missing field: 422 error/message/details; unknown customer: 422 error/status; bad VAT code: 400 code."""
    api = client(sandbox)
    cid = new_customer(api, "C1")
    body = invoice_body(cid, "R1")
    del body["customer_id"]
    missing = api.post("/customer_invoices", json=body)
    assert missing.status_code == 422
    assert missing.json() == {"error": "unprocessable_entity", "message": "Missing required field: customer_id",
                              "details": {"field": "customer_id", "issue": "is required"}}
    unknown = api.post("/customer_invoices", json=invoice_body(999_999, "R1"))
    assert unknown.status_code == 422
    assert set(unknown.json()) == {"error", "status"}
    assert unknown.json()["status"] == 422
    bad_vat = api.post("/customer_invoices", json=invoice_body(cid, "R1", vat="TAX001"))
    assert bad_vat.status_code == 400
    assert bad_vat.json()["code"] == "NotEnumInclude"
    assert bad_vat.json()["field"] == "invoice_lines[0].vat_rate"
    not_enabled = api.post("/customer_invoices", json=invoice_body(cid, "R1", vat="DE_190"))
    assert not_enabled.status_code == 422
    assert "DE_190" in not_enabled.json()["error"]
    assert sandbox.invoices() == []


def test_bad_token_is_a_401_without_limit_headers(sandbox: PennylaneSandbox) -> None:
    """An unknown bearer token answers 401 {error, status}."""
    resp = client(sandbox, "wrong-token").get("/customers")
    assert resp.status_code == 401
    assert resp.json() == {"error": "The access token is invalid", "status": 401}
    assert "ratelimit-remaining" not in resp.headers


def test_rate_limit_answers_429_with_headers(clock: ManualClock) -> None:
    """Past 3 requests in 5 s: 429, plain-text message, retry-after and ratelimit-* headers; then it frees."""
    sandbox = PennylaneSandbox(clock=clock, requests_per_5s=3)
    api = client(sandbox)
    remaining = []
    for _ in range(3):
        resp = api.get("/customers")
        assert resp.status_code == 200
        remaining.append(resp.headers["ratelimit-remaining"])
        clock.advance(1)
    assert remaining == ["2", "1", "0"]
    limited = api.get("/customers")
    assert limited.status_code == 429
    assert limited.text == "Rate limit exceeded. Please retry in 2 seconds."
    assert limited.headers["retry-after"] == "2"
    assert limited.headers["ratelimit-limit"] == "3"
    assert limited.headers["ratelimit-remaining"] == "0"
    assert int(limited.headers["ratelimit-reset"]) == int(clock.now()) + 2
    clock.advance(2)
    assert api.get("/customers").status_code == 200
    assert sandbox.stats()["rate_limited"] == 1


def test_a_new_invoice_is_seen_by_reference_only_after_the_delay(clock: ManualClock) -> None:
    """external_reference lookups miss an invoice for reference_lookup_delay_s; id reads see it at once."""
    sandbox = PennylaneSandbox(clock=clock, reference_lookup_delay_s=30)
    api = client(sandbox)
    cid = new_customer(api, "C1")
    created = new_invoice(api, cid, "LB-main:D1")
    by_ref = {"filter": flt(("external_reference", "eq", "LB-main:D1"))}
    assert api.get("/customer_invoices", params=by_ref).json()["items"] == []
    assert api.get(f"/customer_invoices/{created['id']}").status_code == 200
    by_id = api.get("/customer_invoices", params={"filter": flt(("id", "in", [str(created["id"])]))}).json()
    assert [i["id"] for i in by_id["items"]] == [created["id"]]
    clock.advance(29)
    assert api.get("/customer_invoices", params=by_ref).json()["items"] == []
    clock.advance(1)
    assert [i["id"] for i in api.get("/customer_invoices", params=by_ref).json()["items"]] == [created["id"]]
    assert sandbox.stats()["reference_lookups_hidden"] == 2


def test_drafts_are_numbered_when_finalized_and_lines_are_a_link(sandbox: PennylaneSandbox) -> None:
    """A draft has no number; finalize numbers it once; lines are a {url} link and a paged sub-resource."""
    api = client(sandbox)
    cid = new_customer(api, "C1")
    draft = new_invoice(api, cid, "D1", draft=True)
    assert (draft["status"], draft["invoice_number"], draft["remaining_amount_with_tax"]) == ("draft", "", None)
    assert draft["invoice_lines"] == {"url": f"{API}/customer_invoices/{draft['id']}/invoice_lines"}
    final = api.put(f"/customer_invoices/{draft['id']}/finalize").json()
    assert final["draft"] is False
    assert final["invoice_number"] == "F20260001"
    assert final["status"] == "upcoming"
    assert api.put(f"/customer_invoices/{draft['id']}/finalize").status_code == 422
    other = new_invoice(api, cid, "D2")
    assert other["invoice_number"] == "F20260002"
    lines = api.get(f"/customer_invoices/{draft['id']}/invoice_lines", params={"sort": "id", "limit": "1"}).json()
    assert lines["has_more"] is True
    assert lines["items"][0]["label"] == "Conseil"
    assert lines["items"][0]["currency_amount_before_tax"] == "2125.00"
    rest = api.get(f"/customer_invoices/{draft['id']}/invoice_lines",
                   params={"sort": "id", "limit": "1", "cursor": lines["next_cursor"]}).json()
    assert rest["items"][0]["currency_tax"] == "4.91"  # 89.25 * 5.5 % rounded on the line
    newest_first = api.get(f"/customer_invoices/{draft['id']}/invoice_lines").json()
    assert [ln["label"] for ln in newest_first["items"]] == ["Guide", "Conseil"]


def test_amounts_are_strings_with_vat_rounded_per_line(sandbox: PennylaneSandbox) -> None:
    """Totals are the sums of per-line rounded amounts, as strings."""
    api = client(sandbox)
    inv = new_invoice(api, new_customer(api, "C1"), "R1")
    assert (inv["currency_amount_before_tax"], inv["currency_tax"], inv["currency_amount"]) == (
        "2214.25", "429.91", "2644.16")
    assert inv["amount"] == inv["currency_amount"]
    assert inv["exchange_rate"] == "1"


def test_changelog_is_ordered_paged_and_kept_four_weeks(sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """Changes come oldest first by processed_at; start_date with a cursor is 400; older than 4 weeks is 422."""
    api = client(sandbox)
    cid = new_customer(api, "C1")
    start = clock.now()
    first = new_invoice(api, cid, "R1", draft=True)
    clock.advance(60)
    second = new_invoice(api, cid, "R2", draft=True)
    clock.advance(60)
    api.put(f"/customer_invoices/{first['id']}/finalize")
    clock.advance(60)
    assert api.delete(f"/customer_invoices/{second['id']}").status_code == 204
    since = "2026-01-01T00:00:00.000000Z"
    page = api.get("/changelogs/customer_invoices", params={"start_date": since, "limit": "3"}).json()
    assert [(c["id"], c["operation"]) for c in page["items"]] == [
        (first["id"], "insert"), (second["id"], "insert"), (first["id"], "update")]
    assert page["has_more"] is True
    both = api.get("/changelogs/customer_invoices", params={"start_date": since, "cursor": page["next_cursor"]})
    assert both.status_code == 400
    rest = api.get("/changelogs/customer_invoices", params={"cursor": page["next_cursor"]}).json()
    assert [(c["id"], c["operation"]) for c in rest["items"]] == [(second["id"], "delete")]
    later = api.get("/changelogs/customer_invoices", params={"start_date": "2026-01-01T00:02:00Z"}).json()
    assert len(later["items"]) == 2
    assert api.get(f"/customer_invoices/{second['id']}").status_code == 404
    customers = api.get("/changelogs/customers").json()
    assert [(c["id"], c["operation"]) for c in customers["items"]] == [(cid, "insert")]
    clock.advance(28 * 86400 - 30)  # the first three changes are now past the retention
    kept = api.get("/changelogs/customer_invoices").json()
    assert [(c["id"], c["operation"]) for c in kept["items"]] == [(second["id"], "delete")]
    too_old = api.get("/changelogs/customer_invoices", params={"start_date": since})
    assert too_old.status_code == 422
    assert start < clock.now()


def test_customer_external_reference_is_unique(sandbox: PennylaneSandbox) -> None:
    """A second customer with a used external_reference answers 409; GET /customers lists both kinds."""
    api = client(sandbox)
    new_customer(api, "C1")
    again = api.post("/company_customers", json={"name": "Autre", "external_reference": "C1", "billing_address": {
        "address": "", "postal_code": "", "city": "", "country_alpha2": "FR"}})
    assert again.status_code == 409
    assert again.json()["status"] == 409
    person = api.post("/individual_customers", json={"first_name": "Jeanne", "last_name": "Martin",
                                                     "billing_address": {"address": "2 rue", "postal_code": "69002",
                                                                         "city": "Lyon", "country_alpha2": "fr"}})
    assert person.status_code == 201
    assert "customer_type" not in person.json()
    kinds = sorted(c["customer_type"] for c in api.get("/customers").json()["items"])
    assert kinds == ["company", "individual"]


def test_drop_after_commit_creates_the_invoice_without_answering(sandbox: PennylaneSandbox) -> None:
    """With drop_after_commit the create is committed and the connection is dropped."""
    api = client(sandbox)
    cid = new_customer(api, "C1")
    sandbox.faults = FaultPlan("drop_after_commit=1.0")
    with pytest.raises(httpx.RemoteProtocolError):
        api.post("/customer_invoices", json=invoice_body(cid, "LOST"))
    assert sandbox.invoice_by_reference("LOST") is not None


def test_payments_mark_as_paid_and_admin_view(sandbox: PennylaneSandbox) -> None:
    """A matched payment makes an invoice partially paid; mark_as_paid pays it; the admin view uses Xero's keys."""
    api = client(sandbox)
    cid = new_customer(api, "C1")
    inv = new_invoice(api, cid, "P1")
    draft = new_invoice(api, cid, "P2", draft=True)
    sandbox.create_payment(inv["id"], Decimal("1000"))
    after = api.get(f"/customer_invoices/{inv['id']}").json()
    assert (after["status"], after["remaining_amount_with_tax"], after["paid"]) == ("partially_paid", "1644.16", False)
    payments = api.get(f"/customer_invoices/{inv['id']}/payments").json()["items"]
    assert [(p["currency_amount"], p["status"]) for p in payments] == [("1000.00", "found")]
    assert api.get(f"/customer_invoices/{draft['id']}/payments").json()["items"] == []
    assert api.put(f"/customer_invoices/{inv['id']}/mark_as_paid").status_code == 204
    assert api.get(f"/customer_invoices/{inv['id']}").json()["status"] == "paid"
    admin = httpx.Client(transport=sandbox.transport(), base_url="https://app.pennylane.com")
    view = {row["Reference"]: row for row in admin.get("/_sandbox/invoices").json()}
    assert {k: view["P1"][k] for k in ("SubTotal", "Total", "CurrencyCode", "Status")} == {
        "SubTotal": "2214.25", "Total": "2644.16", "CurrencyCode": "EUR", "Status": "AUTHORISED"}
    assert view["P2"]["Status"] == "DRAFT"
    sandbox.cancel_invoice(inv["id"])
    assert admin.get("/_sandbox/invoices").json()[0]["Status"] == "VOIDED"
    assert admin.get("/_sandbox/stats").json()["invoices"] == 2


def test_state_survives_save_and_load(sandbox: PennylaneSandbox, tmp_path: Path, clock: ManualClock) -> None:
    """save/load keeps customers, invoices, numbering and the changelog."""
    api = client(sandbox)
    cid = new_customer(api, "C1")
    new_invoice(api, cid, "S1")
    sandbox.save(tmp_path / "pennylane.state")
    restored = PennylaneSandbox(clock=clock, requests_per_5s=1000)
    assert restored.load(tmp_path / "pennylane.state")
    again = client(restored)
    assert [row["Reference"] for row in restored.ledger_view()] == ["S1"]
    assert new_invoice(again, cid, "S2")["invoice_number"] == "F20260002"
    assert len(again.get("/changelogs/customer_invoices").json()["items"]) == 2


def test_sandbox_settings_is_a_valid_ledger_block() -> None:
    """sandbox_settings() validates as PennylaneSettings and points at the sandbox URL."""
    block = sandbox_settings("http://127.0.0.1:8765", time_scale=10)
    settings = PennylaneSettings.model_validate(block)
    assert settings.api_url == "http://127.0.0.1:8765/api/external/v2"
    assert settings.time_scale == 10
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == DEMO_API_TOKEN
