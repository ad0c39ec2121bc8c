"""Recorded Salesforce payloads (restforce, simple-salesforce) parse with the connector's models and error mapping."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from connectors.errors import AuthError, QuotaExhaustedError, RateLimitedError, TransientError, VendorError
from connectors.interfaces import TokenStore
from connectors.salesforce.client import (
    SalesforceClient,
    loads,
    parse_deleted,
    parse_describe,
    parse_errors,
    parse_limit_info,
    parse_limits,
    parse_query_page,
    parse_save_results,
    parse_token_response,
    parse_updated,
)
from connectors.salesforce.settings import SalesforceSettings

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "salesforce"


def fixture(name: str) -> Any:
    return loads((FIXTURES / name).read_bytes())


class _NoTokens(TokenStore):
    def load(self, connection: str) -> dict[str, Any] | None:
        return None

    def save(self, connection: str, token: dict[str, Any]) -> None:
        raise AssertionError("nothing is stored while mapping errors")


@pytest.fixture
def client() -> Any:
    c = SalesforceClient(SalesforceSettings(type="salesforce", client_id="x"), _NoTokens())
    yield c
    c.close()


def test_query_pages_parse_with_relationships_and_children() -> None:
    """A query page gives typed records, parent relationship paths and child relationship pages."""
    page = parse_query_page(fixture("restforce_sobject_query_success_response.json"))
    assert (page.total_size, page.done, page.next_url) == (1, True, None)
    [rec] = page.records
    assert (rec.type, rec.id) == ("Whizbang", "foo")
    assert rec.text("Text_Label") == "Hi there!"
    assert rec.flag("Checkbox_Label") is False
    assert rec.get("ParentWhizbang__r.Name") == "Parent Whizbang"
    assert rec.get("parentwhizbang__r.text_label") == "Hello"
    assert dt.date.fromisoformat(rec.text("Date_Label") or "") == dt.date(2010, 1, 1)
    children = rec.children("Whizbangs__r")
    assert [c.text("Name") for c in children.records] == ["Child Whizbang"]
    assert children.records[0].id == "a00E0000004D5lsIAC"
    assert rec.children("Nothing__r").records == []


def test_paginated_query_pages_expose_next_records_url() -> None:
    """The first page of a paginated query carries nextRecordsUrl; the last is done."""
    first = parse_query_page(fixture("restforce_sobject_query_paginated_first_page_response.json"))
    last = parse_query_page(fixture("restforce_sobject_query_paginated_last_page_response.json"))
    assert (first.done, first.next_url, first.total_size) == (False, "/services/data/v26.0/query/01gD", 2)
    assert (last.done, last.next_url) == (True, None)
    assert [r.text("Text_Label") for r in first.records + last.records] == ["First Page", "Last Page"]


def test_describe_parses_fields() -> None:
    """A describe answer lists each field with its type, flags and references."""
    described = parse_describe(fixture("restforce_sobject_sobject_describe_success_response.json"))
    assert described.name == "Whizbang"
    assert described.has("id")
    assert described.has("OwnerId")
    owner = described.field("ownerid")
    assert owner is not None
    assert owner.type == "reference"
    assert owner.updateable
    record_id = described.field("Id")
    assert record_id is not None
    assert (record_id.type, record_id.length, record_id.updateable) == ("id", 18, False)


def test_token_answers_have_no_expiry_and_rarely_a_refresh_token() -> None:
    """Token answers parse without expires_in; a refresh answer without rotation carries no refresh token."""
    auth = parse_token_response(fixture("restforce_auth_success_response.json"))
    assert auth.instance_url == "https://na1.salesforce.com"
    assert auth.issued_at == 1278448832702
    assert auth.refresh_token is None
    assert auth.access_token.startswith("00Dx")
    assert auth.access_token not in repr(auth)
    refreshed = parse_token_response(fixture("restforce_refresh_success_response.json"))
    assert (refreshed.access_token, refreshed.refresh_token) == ("refreshed_access_token", None)
    for name in ("restforce_auth_error_response.json", "restforce_refresh_error_response.json"):
        [error] = parse_errors(fixture(name))
        assert error.code == "invalid_grant"
        assert error.message


def test_error_arrays_map_to_the_error_tree(client: SalesforceClient) -> None:
    """Recorded error arrays map to connectors.errors types with the vendor code and message."""
    expired = client.map_status(401, fixture("restforce_expired_session_response.json"), {}, "GET", "/q")
    assert isinstance(expired, AuthError)
    assert expired.code == "INVALID_SESSION_ID"
    for name, code in (("restforce_sobject_query_error_response.json", "INVALID_FIELD"),
                       ("restforce_sobject_write_error_response.json", "INVALID_FIELD"),
                       ("restforce_sobject_delete_error_response.json", "NOT_FOUND"),
                       ("restforce_sobject_upsert_error_response.json", "NOT_FOUND")):
        mapped = client.map_status(400 if code != "NOT_FOUND" else 404, fixture(name), {}, "GET", "/x")
        assert type(mapped) is VendorError, name
        assert mapped.code == code, name
        assert parse_errors(fixture(name))[0].message in mapped.detail
    several = client.map_status(300, fixture("restforce_sobject_upsert_multiple_error_response.json"), {}, "PATCH",
                                "/x")
    assert type(several) is VendorError
    assert several.code == "MULTIPLE_CHOICES"
    assert "/Whizbang/bar" in several.detail
    limit = [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
    quota = client.map_status(403, limit, {"Sforce-Limit-Info": "api-usage=100000/100000"}, "GET", "/q")
    assert isinstance(quota, QuotaExhaustedError)
    assert quota.detail == ("Salesforce daily API request limit exhausted (DailyApiRequests 100000/100000); the "
                            "pipeline stops until it resets")
    concurrent = [{"message": "ConcurrentRequests (Concurrent API Requests) Limit exceeded.",
                   "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
    assert isinstance(client.map_status(403, concurrent, {}, "GET", "/q"), RateLimitedError)
    unavailable = client.map_status(503, "<html>busy</html>", {"Retry-After": "2"}, "GET", "/q")
    assert isinstance(unavailable, TransientError)
    assert unavailable.retry_after == 2.0


def test_collection_results_keep_status_codes() -> None:
    """sObject Collections results give per-record success and statusCode errors with their fields."""
    partial = parse_save_results(fixture("constructed/composite_sobjects_create_partial_failure.json"))
    assert [(r.id, r.success) for r in partial] == [("001000000000001AAA", True), (None, False)]
    assert partial[1].errors[0].code == "REQUIRED_FIELD_MISSING"
    assert partial[1].errors[0].fields == ("Name",)
    assert "REQUIRED_FIELD_MISSING" in partial[1].message()
    rolled = parse_save_results(fixture("constructed/composite_sobjects_create_allornone_rollback.json"))
    assert [r.errors[0].code for r in rolled] == ["ALL_OR_NONE_OPERATION_ROLLED_BACK", "REQUIRED_FIELD_MISSING"]
    [created] = parse_save_results(fixture("restforce_sobject_create_success_response.json"))
    assert (created.id, created.success, created.errors) == ("some_id", True, ())
    [upserted] = parse_save_results(fixture("restforce_sobject_upsert_created_success_response.json"))
    assert (upserted.id, upserted.success) == ("foo", True)


def test_replication_and_limits_payloads() -> None:
    """Get-updated, get-deleted, limits and Sforce-Limit-Info parse into ids, UTC datetimes and counts."""
    updated = parse_updated(fixture("restforce_sobject_get_updated_success_response.json"))
    assert len(updated.ids) == 7
    assert updated.latest_covered == dt.datetime(2015, 8, 19, 8, 17, tzinfo=dt.UTC)
    deleted = parse_deleted(fixture("restforce_sobject_get_deleted_success_response.json"))
    assert deleted.records == [("a00D0000008pQRAIA2", dt.datetime(2013, 5, 7, 22, 7, 19, tzinfo=dt.UTC))]
    assert deleted.earliest_available == dt.datetime(2013, 5, 3, 15, 57, tzinfo=dt.UTC)
    limits = parse_limits(fixture("simple-salesforce_ORGANIZATION_LIMITS_RESPONSE.json"))
    assert limits["DailyApiRequests"] == (15000, 14998)
    assert parse_limit_info("api-usage=25/5000; per-app-api-usage=17/250(appName=sample-connected-app)") == {
        "api-usage": (25, 5000), "per-app-api-usage": (17, 250)}
    assert parse_limit_info("api-usage=10018/100000,api-bursts=1/750")["api-usage"] == (10018, 100000)


def test_numbers_parse_as_decimal() -> None:
    """JSON numbers with a fraction are read as Decimal, never float."""
    page = parse_query_page(loads(b'{"totalSize":1,"done":true,"records":[{"attributes":{"type":"Opportunity"},'
                                  b'"Id":"006000000000001AAA","Amount":1234.10,"Quantity":3}]}'))
    [rec] = page.records
    assert rec.decimal("Amount") == Decimal("1234.10")
    assert isinstance(rec.get("Amount"), Decimal)
    assert rec.decimal("Quantity") == Decimal(3)
