"""One kit per CRM connector: what the shared contract suite needs to drive that vendor's sandbox.

The suite in ``test_crm_contract.py`` is vendor-neutral; everything it cannot say in the terms of
:class:`~connectors.interfaces.CrmSource` lives here: how to build the sandbox (with a seeded book and a fault
plan), the settings block that points the connector at it, the user actions a test performs in the CRM
(touching deals to one timestamp, editing, deleting, archiving), how to read a written field back, how to expire
or revoke a credential, and which ids do not exist.

A new CRM connector registered under ``ledgerbridge.crm`` gets a subclass of :class:`CrmKit` added to
:data:`KITS`; until then the contract suite fails for it.
"""

from __future__ import annotations

import abc
import datetime as dt
import threading
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

from connectors.hubspot.sandbox import HubSpotSandbox
from connectors.interfaces import FieldSpec
from connectors.pipedrive.sandbox import PipedriveSandbox
from connectors.salesforce.adapter import api_field_name
from connectors.salesforce.sandbox import SalesforceSandbox
from connectors.sandboxkit import Clock, SandboxApp
from connectors.seedbook import Book, generate_book
from sync.sandboxes import build_sandbox, crm_sandbox_settings

__all__ = ["KITS", "SCALE", "SEED", "CrmKit", "StepClock"]

SEED = 7
#: Virtual seconds per real second on every sandbox clock; connectors get the same ``time_scale``.
SCALE = 20.0

S = TypeVar("S", bound=SandboxApp)


class StepClock(Clock):
    """A compressed sandbox clock that a test can also move forward at once (to let tokens expire)."""

    def __init__(self, scale: float = SCALE) -> None:
        super().__init__(scale=scale)
        self._offset = 0.0
        self._step_lock = threading.Lock()

    def now(self) -> float:
        with self._step_lock:
            offset = self._offset
        return super().now() + offset

    def advance(self, seconds: float) -> None:
        with self._step_lock:
            self._offset += seconds


def _as(sb: SandboxApp, kind: type[S]) -> S:
    if not isinstance(sb, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(sb).__name__}")
    return sb


class CrmKit(abc.ABC):
    """How the contract suite drives one CRM connector and its sandbox."""

    #: The connector's name in the ``ledgerbridge.crm`` entry-point group.
    vendor: ClassVar[str]
    #: Records one write call carries (the batch size of ``write_fields``).
    write_batch: ClassVar[int]
    #: Records the write-back test updates: more than one batch, few when every record is a call.
    write_records: ClassVar[int]
    #: A well-formed deal id that does not exist in the sandbox.
    unknown_id: ClassVar[str]
    #: ``ApiStats.by_endpoint`` prefixes of the calls that create custom fields (or their groups).
    field_create_endpoints: ClassVar[tuple[str, ...]]
    #: ``ApiStats.by_endpoint`` name of the OAuth token call, or None when the connector has no refresh flow.
    token_endpoint: ClassVar[str | None] = None
    #: Whether the vendor hands out a new refresh token on every refresh.
    rotates_refresh_tokens: ClassVar[bool] = False
    #: Deals the sandbox needs so that a pull still calls the API after its first page of ``page_size``.
    midpull_deals: ClassVar[int] = 40

    # -- sandbox and settings ------------------------------------------------------------------------------
    @staticmethod
    def book(deals: int) -> Book:
        """The seeded book of ``deals`` deals that :meth:`build` loads (half as many companies)."""
        return generate_book(SEED, companies=max(deals // 2, 1), deals=deals)

    def build(self, *, deals: int, faults: str | None, clock: Clock, oauth: bool = False) -> SandboxApp:
        """A sandbox loaded with :meth:`book` of ``deals`` deals; ``oauth`` enables the OAuth refresh flow."""
        sb = build_sandbox(self.vendor, seed=SEED, deals=0, faults=faults, clock=clock)
        load = getattr(sb, "load_book", None)
        if load is None:
            raise TypeError(f"the {self.vendor} sandbox cannot load a book")
        load(self.book(deals))
        if oauth:
            self.enable_oauth(sb)
        return sb

    def settings(self, sb: SandboxApp, url: str, *, oauth: bool = False) -> dict[str, Any]:
        """The ``crm:`` block pointing the connector at ``sb`` served at ``url``."""
        if oauth:
            raise NotImplementedError(f"{self.vendor} has no OAuth refresh flow")
        return crm_sandbox_settings(self.vendor, url, time_scale=SCALE)

    def enable_oauth(self, sb: SandboxApp) -> None:
        raise NotImplementedError(f"{self.vendor} has no OAuth refresh flow")

    # -- user actions in the CRM ---------------------------------------------------------------------------
    @abc.abstractmethod
    def touch(self, sb: SandboxApp, deal_ids: Sequence[str], at: dt.datetime) -> None:
        """Set the modification time of ``deal_ids`` to ``at`` (a bulk update or a workflow run)."""

    @abc.abstractmethod
    def modify(self, sb: SandboxApp, deal_id: str) -> None:
        """Edit one deal as a user would (its modification time moves to now)."""

    @abc.abstractmethod
    def retract(self, sb: SandboxApp, deal_id: str) -> None:
        """The user action that takes a deal back (delete; what HubSpot's API calls archive)."""

    def shelve(self, sb: SandboxApp, deal_id: str) -> bool:
        """Hide a deal without retracting it, when the vendor has such an action; False when it has none."""
        return False

    # -- inspection ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def read_field(self, sb: SandboxApp, deal_id: str, spec: FieldSpec) -> Any:
        """The value of a written-back deal field as the sandbox stores it (None when empty)."""

    # -- credentials -----------------------------------------------------------------------------------------
    def expire_access(self, sb: SandboxApp) -> None:
        """Make every access token or session the sandbox issued invalid (refresh tokens stay valid)."""
        raise NotImplementedError(f"{self.vendor} has no OAuth refresh flow")

    def revoke(self, sb: SandboxApp) -> None:
        """Revoke the static credential of :meth:`settings` (a private-app or API token)."""
        raise NotImplementedError(f"{self.vendor} has no static credential")

    @abc.abstractmethod
    def bad_credentials(self) -> dict[str, Any]:
        """Settings overrides with a credential the vendor refuses."""

    @abc.abstractmethod
    def unreachable(self, url: str) -> dict[str, Any]:
        """Settings overrides pointing every call at ``url``, where nothing listens, with few attempts."""


class HubSpotKit(CrmKit):
    """HubSpot: private-app token (no refresh flow); deleting a deal is what the API calls archiving."""

    vendor = "hubspot"
    write_batch = 100
    write_records = 105
    unknown_id = "99999999999"
    field_create_endpoints = ("POST /crm/v3/properties/deals",)

    def touch(self, sb: SandboxApp, deal_ids: Sequence[str], at: dt.datetime) -> None:
        _as(sb, HubSpotSandbox).touch("deals", deal_ids, at)

    def modify(self, sb: SandboxApp, deal_id: str) -> None:
        _as(sb, HubSpotSandbox).modify_deal(deal_id, description="Edited in HubSpot")

    def retract(self, sb: SandboxApp, deal_id: str) -> None:
        _as(sb, HubSpotSandbox).archive_object("deals", deal_id)

    def read_field(self, sb: SandboxApp, deal_id: str, spec: FieldSpec) -> Any:
        return _as(sb, HubSpotSandbox).properties_of("deals", deal_id).get(spec.name) or None

    def revoke(self, sb: SandboxApp) -> None:
        _as(sb, HubSpotSandbox).access_tokens = ()

    def bad_credentials(self) -> dict[str, Any]:
        return {"access_token": "pat-na1-contract-wrong-token"}

    def unreachable(self, url: str) -> dict[str, Any]:
        return {"base_url": url, "max_attempts": 2}


class SalesforceKit(CrmKit):
    """Salesforce: OAuth refresh-token flow (rotating when the org says so); deletes go to the recycle bin."""

    vendor = "salesforce"
    write_batch = 200
    write_records = 205
    unknown_id = "006000000000000AAA"
    field_create_endpoints = ("POST tooling/sobjects/CustomField",)
    token_endpoint = "POST /services/oauth2/token"
    rotates_refresh_tokens = True
    # queryAll answers batches of at least 200 records, hydrated before their first page is handed out.
    midpull_deals = 230

    def settings(self, sb: SandboxApp, url: str, *, oauth: bool = False) -> dict[str, Any]:
        # The sandbox block already uses the refresh-token flow; smallest query batches, to page queryAll.
        return {**crm_sandbox_settings(self.vendor, url, time_scale=SCALE), "query_batch_size": 200}

    def enable_oauth(self, sb: SandboxApp) -> None:
        _as(sb, SalesforceSandbox).refresh_rotation = True

    def touch(self, sb: SandboxApp, deal_ids: Sequence[str], at: dt.datetime) -> None:
        _as(sb, SalesforceSandbox).touch("Opportunity", deal_ids, at)

    def modify(self, sb: SandboxApp, deal_id: str) -> None:
        _as(sb, SalesforceSandbox).modify("Opportunity", deal_id, NextStep="Edited in Salesforce")

    def retract(self, sb: SandboxApp, deal_id: str) -> None:
        _as(sb, SalesforceSandbox).delete("Opportunity", deal_id)

    def read_field(self, sb: SandboxApp, deal_id: str, spec: FieldSpec) -> Any:
        return _as(sb, SalesforceSandbox).record("Opportunity", deal_id).get(api_field_name(spec.name))

    def expire_access(self, sb: SandboxApp) -> None:
        _as(sb, SalesforceSandbox).expire_sessions()

    def bad_credentials(self) -> dict[str, Any]:
        return {"refresh_token": "5Aep861-contract-wrong-token"}

    def unreachable(self, url: str) -> dict[str, Any]:
        return {"instance_url": url, "login_url": url, "max_attempts": 2}


class PipedriveKit(CrmKit):
    """Pipedrive: API token, or an OAuth app (refresh tokens do not rotate); archiving is not deleting."""

    vendor = "pipedrive"
    write_batch = 1
    write_records = 12
    unknown_id = "424242"
    field_create_endpoints = ("POST /api/v2/dealFields",)
    token_endpoint = "POST /oauth/token"
    CLIENT = ("contract-app", "contract-app-secret")

    def settings(self, sb: SandboxApp, url: str, *, oauth: bool = False) -> dict[str, Any]:
        block = crm_sandbox_settings(self.vendor, url, time_scale=SCALE)
        if oauth:
            del block["api_token"]
            block.update(client_id=self.CLIENT[0], client_secret=self.CLIENT[1],
                         refresh_token=_as(sb, PipedriveSandbox).issue_refresh_token(), token_url=f"{url}/oauth/token")
        return block

    def enable_oauth(self, sb: SandboxApp) -> None:
        _as(sb, PipedriveSandbox).oauth_client = self.CLIENT

    def touch(self, sb: SandboxApp, deal_ids: Sequence[str], at: dt.datetime) -> None:
        _as(sb, PipedriveSandbox).touch([int(i) for i in deal_ids], at)

    def modify(self, sb: SandboxApp, deal_id: str) -> None:
        _as(sb, PipedriveSandbox).modify_deal(int(deal_id), title=f"Edited in Pipedrive {deal_id}")

    def retract(self, sb: SandboxApp, deal_id: str) -> None:
        _as(sb, PipedriveSandbox).delete_deal(int(deal_id))

    def shelve(self, sb: SandboxApp, deal_id: str) -> bool:
        _as(sb, PipedriveSandbox).archive_deal(int(deal_id))
        return True

    def read_field(self, sb: SandboxApp, deal_id: str, spec: FieldSpec) -> Any:
        pd = _as(sb, PipedriveSandbox)
        marker = f"[ledgerbridge:{spec.name}]"
        keys = [f["field_code"] for f in pd.fields_of("deal") if marker in str(f.get("description") or "")]
        if len(keys) != 1:
            raise AssertionError(f"{len(keys)} deal fields carry {marker}")
        return pd.deal(int(deal_id))["custom_fields"].get(keys[0])

    def expire_access(self, sb: SandboxApp) -> None:
        # Access tokens live an hour on the sandbox clock: two hours later every one issued is expired.
        clock = sb.clock
        if not isinstance(clock, StepClock):
            raise TypeError("the sandbox must run on a StepClock to expire its tokens")
        clock.advance(7200)

    def revoke(self, sb: SandboxApp) -> None:
        _as(sb, PipedriveSandbox).api_tokens = ()

    def bad_credentials(self) -> dict[str, Any]:
        return {"api_token": "pd-contract-wrong-token"}

    def unreachable(self, url: str) -> dict[str, Any]:
        return {"base_url": url, "max_attempts": 2}


KITS: dict[str, CrmKit] = {kit.vendor: kit for kit in (HubSpotKit(), SalesforceKit(), PipedriveKit())}
