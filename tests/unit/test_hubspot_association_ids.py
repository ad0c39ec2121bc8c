"""The HUBSPOT_DEFINED association type ids of the catalog are HubSpot's published ones (developers.hubspot.com,
associations v4, "Association type ID values"), and the sandbox serves exactly those."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from connectors.hubspot.catalog import ASSOCIATION_TYPES, PRIMARY_ASSOCIATIONS, reverse_type_id
from connectors.hubspot.sandbox import HubSpotSandbox

#: (from, to) -> the unlabelled type id, as HubSpot publishes it.
PUBLISHED: dict[tuple[str, str], int] = {
    ("contacts", "companies"): 279, ("companies", "contacts"): 280,
    ("deals", "contacts"): 3, ("contacts", "deals"): 4,
    ("deals", "companies"): 341, ("companies", "deals"): 342,
    ("deals", "line_items"): 19, ("line_items", "deals"): 20,
    ("deals", "quotes"): 63, ("quotes", "deals"): 64,
    ("quotes", "line_items"): 67, ("line_items", "quotes"): 68,
    ("quotes", "contacts"): 69, ("contacts", "quotes"): 70,
    ("quotes", "companies"): 71, ("companies", "quotes"): 72,
    ("contacts", "tickets"): 15, ("tickets", "contacts"): 16,
    ("tickets", "companies"): 339, ("companies", "tickets"): 340,
    ("deals", "tickets"): 27, ("tickets", "deals"): 28,
    ("companies", "calls"): 181, ("calls", "companies"): 182,
    ("companies", "emails"): 185, ("emails", "companies"): 186,
    ("companies", "meetings"): 187, ("meetings", "companies"): 188,
    ("companies", "tasks"): 191, ("tasks", "companies"): 192,
    ("contacts", "calls"): 193, ("calls", "contacts"): 194,
    ("contacts", "emails"): 197, ("emails", "contacts"): 198,
    ("contacts", "meetings"): 199, ("meetings", "contacts"): 200,
    ("contacts", "tasks"): 203, ("tasks", "contacts"): 204,
    ("deals", "calls"): 205, ("calls", "deals"): 206,
    ("deals", "emails"): 209, ("emails", "deals"): 210,
    ("deals", "meetings"): 211, ("meetings", "deals"): 212,
    ("deals", "tasks"): 215, ("tasks", "deals"): 216,
}

#: (from, to) -> the "Primary" (company) type id, as HubSpot publishes it.
PUBLISHED_PRIMARY: dict[tuple[str, str], int] = {
    ("contacts", "companies"): 1, ("companies", "contacts"): 2,
    ("deals", "companies"): 5, ("companies", "deals"): 6,
    ("companies", "tickets"): 25, ("tickets", "companies"): 26,
}


def test_every_unlabelled_type_id_is_the_published_one() -> None:
    assert {pair: a.type_id for pair, a in ASSOCIATION_TYPES.items()} == PUBLISHED
    assert all((a.from_type, a.to_type) == pair and a.label is None for pair, a in ASSOCIATION_TYPES.items())


def test_every_primary_type_id_is_the_published_one() -> None:
    assert {pair: a.type_id for pair, a in PRIMARY_ASSOCIATIONS.items()} == PUBLISHED_PRIMARY
    assert {a.label for a in PRIMARY_ASSOCIATIONS.values()} == {"Primary"}


@pytest.mark.parametrize("table", [PUBLISHED, PUBLISHED_PRIMARY])
def test_the_reverse_of_each_type_is_the_other_direction(table: dict[tuple[str, str], int]) -> None:
    for (f, t), type_id in table.items():
        assert reverse_type_id(type_id) == table[(t, f)]


@pytest.fixture
def api() -> Iterator[httpx.Client]:
    sandbox = HubSpotSandbox(seed=11, requests_per_10s=100_000, searches_per_s=100_000)
    with httpx.Client(transport=sandbox.transport(), base_url="https://api.hubapi.com",
                      headers={"Authorization": "Bearer demo-hubspot-token"}) as client:
        yield client


def test_the_sandbox_lists_the_published_types_for_each_pair(api: httpx.Client) -> None:
    """GET /crm/v4/associations/{from}/{to}/labels answers the unlabelled type, and the primary one where any."""
    for (f, t), type_id in PUBLISHED.items():
        resp = api.get(f"/crm/v4/associations/{f}/{t}/labels")
        assert resp.status_code == 200, (f, t, resp.text)
        got = {(row["category"], row["typeId"], row["label"]) for row in resp.json()["results"]}
        want: set[tuple[str, int, str | None]] = {("HUBSPOT_DEFINED", type_id, None)}
        if (f, t) in PUBLISHED_PRIMARY:
            want.add(("HUBSPOT_DEFINED", PUBLISHED_PRIMARY[(f, t)], "Primary"))
        assert got == want, (f, t)
