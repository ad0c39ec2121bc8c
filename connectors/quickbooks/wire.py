"""QuickBooks Online wire formats shared by the client, the adapter and the sandbox.

- JSON with exact decimals: amounts are read into :class:`~decimal.Decimal` and written from it without
  passing through ``float``.
- Timestamps: ``MetaData.LastUpdatedTime`` is ``2024-03-01T00:00:00-07:00`` (seconds, the company's UTC
  offset, no ``Z``, no fraction); the ``time`` of an answer carries milliseconds.
- Where LedgerBridge keeps its own keys in a QuickBooks company (see the adapter): the invoice reference
  in ``PrivateNote`` (and, shortened, in ``DocNumber``), the customer's external number in ``Notes``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
from typing import Any

from connectors import jsonwire
from connectors.domain import Customer

__all__ = [
    "DOC_NUMBER_MAX",
    "NUMBER_TAG",
    "REFERENCE_TAG",
    "customer_body",
    "display_name",
    "doc_number",
    "dumps",
    "loads",
    "note_value",
    "parse_datetime",
    "qbo_datetime",
    "quote",
]

DOC_NUMBER_MAX = 21
DISPLAY_NAME_MAX = 100
#: The line of an invoice's ``PrivateNote`` that carries the full LedgerBridge reference.
REFERENCE_TAG = "LedgerBridge reference: "
#: The line of a customer's ``Notes`` that carries the external (CRM) number.
NUMBER_TAG = "LedgerBridge number: "


def loads(data: bytes | str) -> Any:
    """Parse JSON with every non-integer number as a Decimal."""
    return jsonwire.loads(data)


def dumps(obj: Any) -> str:
    """Serialise ``obj`` to JSON; Decimals are written exactly as JSON numbers (never through float)."""
    return jsonwire.dumps(obj)


def qbo_datetime(when: dt.datetime, tz: dt.tzinfo | None = None, *, millis: bool = False) -> str:
    """``2024-03-01T00:00:00-07:00``: seconds (or milliseconds), with the offset of ``tz`` (default UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    local = when.astimezone(tz or dt.UTC)
    return local.isoformat(timespec="milliseconds" if millis else "seconds")


def parse_datetime(value: Any) -> dt.datetime | None:
    """An aware datetime from a QBO timestamp (offset, ``Z`` or naive = UTC); None when unparseable."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    text = str(value).strip()
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            day = dt.date.fromisoformat(text[:10])
        except ValueError:
            return None
        return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def quote(value: str) -> str:
    """A string literal of the query language: single quotes, an inner quote escaped with a backslash."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def doc_number(reference: str) -> str:
    """The ``DocNumber`` (at most 21 characters) that stands for ``reference`` in QuickBooks.

    A reference that fits is used as it is. A longer one becomes ``<digest>~<tail>``: 9 base32 characters
    of its SHA-256 (45 bits) and the last 11 characters of the reference (the deal id, for people). The
    full reference is in ``PrivateNote``; a lookup by DocNumber checks it there.
    """
    if len(reference) <= DOC_NUMBER_MAX:
        return reference
    digest = base64.b32encode(hashlib.sha256(reference.encode()).digest()).decode()[:9]
    return f"{digest}~{reference[-(DOC_NUMBER_MAX - 10):]}"


_TAG_LINE = re.compile(r"^\s*(?P<tag>[^:\n]+:)\s*(?P<value>\S.*?)\s*$", re.MULTILINE)


def note_value(note: Any, tag: str) -> str | None:
    """The value on the line of ``note`` that starts with ``tag`` (``REFERENCE_TAG``, ``NUMBER_TAG``...)."""
    if not isinstance(note, str) or not note:
        return None
    wanted = tag.strip().lower()
    for m in _TAG_LINE.finditer(note):
        if m.group("tag").strip().lower() == wanted:
            return m.group("value")
    return None


def display_name(text: str) -> str:
    """``text`` as a customer ``DisplayName``: one line, at most 100 characters, no colon (a colon separates the
    levels of a fully qualified name, ``Parent:Job``)."""
    return " ".join(text.replace(":", " -").split())[:DISPLAY_NAME_MAX].strip()


def customer_body(customer: Customer, name: str, number: str | None = None) -> dict[str, Any]:
    """The ``POST /customer`` body for ``customer`` under the DisplayName ``name``; ``number`` (the external
    number) goes on a line of ``Notes``, with the SIRET (or SIREN) on the next."""
    notes = [f"{NUMBER_TAG}{number}"] if number else []
    if customer.siret:
        notes.append(f"SIRET: {customer.siret}")
    elif customer.siren:
        notes.append(f"SIREN: {customer.siren}")
    body: dict[str, Any] = {"DisplayName": name, "CompanyName": customer.name.strip()[:100] or name}
    if notes:
        body["Notes"] = "\n".join(notes)
    if customer.email:
        body["PrimaryEmailAddr"] = {"Address": customer.email}
    if customer.domain:
        body["WebAddr"] = {"URI": f"https://{customer.domain}"}
    if customer.vat_number:
        body["PrimaryTaxIdentifier"] = customer.vat_number[:20]
    if customer.currency:
        body["CurrencyRef"] = {"value": customer.currency}
    address = customer.address
    fields = {"Line1": address.line1, "Line2": address.line2, "City": address.city,
              "PostalCode": address.postal_code, "CountrySubDivisionCode": address.region,
              "Country": address.country or customer.country}
    if any(fields.values()):
        body["BillAddr"] = {k: v for k, v in fields.items() if v}
    return body
