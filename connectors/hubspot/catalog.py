"""What a HubSpot portal is made of: object types, association types, standard properties, pipelines.

The sandbox builds its portal from these tables; the adapter uses the object-type and association-type
names. Sources: developers.hubspot.com (object type ids, the association type table, the default
properties of each object), the crm-pipelines-v3 spec (stage metadata as strings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "ANALYTICS_SOURCES",
    "ASSOCIATION_TYPES",
    "CURRENCIES",
    "DEFAULT_PROPERTIES",
    "ENGAGEMENT_TYPES",
    "OBJECT_TYPES",
    "PRIMARY_ASSOCIATIONS",
    "QUOTE_STATES",
    "STANDARD_GROUPS",
    "AssociationType",
    "PropertyDef",
    "canonical_type",
    "reverse_type_id",
    "singular",
    "standard_properties",
]

#: Canonical (plural) object type -> (object type id, singular, aliases).
OBJECT_TYPES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "contacts": ("0-1", "contact", ("contact",)),
    "companies": ("0-2", "company", ("company",)),
    "deals": ("0-3", "deal", ("deal",)),
    "tickets": ("0-5", "ticket", ("ticket",)),
    "products": ("0-7", "product", ("product",)),
    "line_items": ("0-8", "line_item", ("line_item", "lineitem", "lineitems", "line-items")),
    "quotes": ("0-14", "quote", ("quote",)),
    # Engagements (activities): HubSpot's object type ids 0-48 calls, 0-49 emails, 0-47 meetings, 0-27 tasks.
    "calls": ("0-48", "call", ("call",)),
    "emails": ("0-49", "email", ("email",)),
    "meetings": ("0-47", "meeting", ("meeting", "meeting_event", "meeting_events")),
    "tasks": ("0-27", "task", ("task",)),
}

#: The engagement (activity) object types, by the activity kind each one records.
ENGAGEMENT_TYPES: dict[str, str] = {"call": "calls", "meeting": "meetings", "email": "emails", "task": "tasks"}

_ALIASES: dict[str, str] = {}
for _plural, (_tid, _single, _names) in OBJECT_TYPES.items():
    _ALIASES[_plural] = _plural
    _ALIASES[_tid] = _plural
    for _name in _names:
        _ALIASES[_name] = _plural


def canonical_type(name: str) -> str | None:
    """The plural object type for any spelling HubSpot accepts (``deal``, ``deals``, ``0-3``)."""
    return _ALIASES.get(name.strip().lower())


def singular(object_type: str) -> str:
    return OBJECT_TYPES[object_type][1]


@dataclass(frozen=True)
class AssociationType:
    """A HUBSPOT_DEFINED association type between two object types."""

    from_type: str
    to_type: str
    type_id: int
    label: str | None = None


# (from, to, unlabelled type id, reverse unlabelled type id); HubSpot's association type table.
_PAIRS = (
    ("contacts", "companies", 279, 280),
    ("deals", "contacts", 3, 4),
    ("deals", "companies", 341, 342),
    ("deals", "line_items", 19, 20),
    ("deals", "quotes", 63, 64),
    ("quotes", "line_items", 67, 68),
    ("quotes", "contacts", 69, 70),
    ("quotes", "companies", 71, 72),
    ("tickets", "contacts", 16, 15),
    ("tickets", "companies", 339, 340),
    ("deals", "tickets", 27, 28),
    ("companies", "calls", 181, 182),
    ("companies", "emails", 185, 186),
    ("companies", "meetings", 187, 188),
    ("companies", "tasks", 191, 192),
    ("contacts", "calls", 193, 194),
    ("contacts", "emails", 197, 198),
    ("contacts", "meetings", 199, 200),
    ("contacts", "tasks", 203, 204),
    ("deals", "calls", 205, 206),
    ("deals", "emails", 209, 210),
    ("deals", "meetings", 211, 212),
    ("deals", "tasks", 215, 216),
)

#: (from, to) -> the default (unlabelled) association type.
ASSOCIATION_TYPES: dict[tuple[str, str], AssociationType] = {}
for _f, _t, _id, _rid in _PAIRS:
    ASSOCIATION_TYPES[(_f, _t)] = AssociationType(_f, _t, _id)
    ASSOCIATION_TYPES[(_t, _f)] = AssociationType(_t, _f, _rid)

#: (from, to) -> the "Primary" labelled association type.
PRIMARY_ASSOCIATIONS: dict[tuple[str, str], AssociationType] = {
    ("contacts", "companies"): AssociationType("contacts", "companies", 1, "Primary"),
    ("companies", "contacts"): AssociationType("companies", "contacts", 2, "Primary"),
    ("deals", "companies"): AssociationType("deals", "companies", 5, "Primary"),
    ("companies", "deals"): AssociationType("companies", "deals", 6, "Primary"),
    ("tickets", "companies"): AssociationType("tickets", "companies", 26, "Primary"),
    ("companies", "tickets"): AssociationType("companies", "tickets", 25, "Primary"),
}

_REVERSE: dict[int, int] = {}
for (_f, _t), _a in ASSOCIATION_TYPES.items():
    _REVERSE[_a.type_id] = ASSOCIATION_TYPES[(_t, _f)].type_id
for (_f, _t), _a in PRIMARY_ASSOCIATIONS.items():
    _REVERSE[_a.type_id] = PRIMARY_ASSOCIATIONS[(_t, _f)].type_id


def reverse_type_id(type_id: int) -> int | None:
    """The association type of the other direction (341 <-> 342, 5 <-> 6...)."""
    return _REVERSE.get(type_id)


@dataclass(frozen=True)
class PropertyDef:
    """One property definition (the v3 properties API's shape, built by :meth:`to_json`)."""

    name: str
    label: str
    type: str  # string | number | date | datetime | enumeration | bool
    field_type: str
    group: str
    options: tuple[tuple[str, str], ...] = ()  # (value, label)
    read_only: bool = False
    calculated: bool = False
    hubspot_defined: bool = True
    has_unique_value: bool = False
    description: str = ""

    def to_json(self, display_order: int, created_at: str) -> dict[str, Any]:
        return {
            "updatedAt": created_at,
            "createdAt": created_at,
            "name": self.name,
            "label": self.label,
            "type": self.type,
            "fieldType": self.field_type,
            "description": self.description,
            "groupName": self.group,
            "options": [
                {"label": label, "value": value, "displayOrder": i, "hidden": False, "description": ""}
                for i, (value, label) in enumerate(self.options)
            ],
            "displayOrder": display_order,
            "calculated": self.calculated,
            "externalOptions": False,
            "hasUniqueValue": self.has_unique_value,
            "hidden": False,
            "hubspotDefined": self.hubspot_defined,
            "modificationMetadata": {
                "archivable": not self.hubspot_defined,
                "readOnlyDefinition": self.hubspot_defined,
                "readOnlyValue": self.read_only,
            },
            "formField": not self.read_only,
            "archived": False,
        }


_BOOL = (("true", "Yes"), ("false", "No"))
# Engagement enumerations (developers.hubspot.com, calls, emails, meetings and tasks guides).
_CALL_DIRECTIONS = (("INBOUND", "Inbound"), ("OUTBOUND", "Outbound"))
_CALL_STATUSES = tuple((v, v.replace("_", " ").title()) for v in (
    "BUSY", "CALLING_CRM_USER", "CANCELED", "COMPLETED", "CONNECTING", "FAILED", "IN_PROGRESS", "NO_ANSWER",
    "QUEUED", "RINGING"))
_EMAIL_DIRECTIONS = (("EMAIL", "Sent by a user"), ("INCOMING_EMAIL", "Reply"), ("FORWARDED_EMAIL", "Forwarded"))
_EMAIL_STATUSES = tuple((v, v.title()) for v in ("BOUNCED", "FAILED", "SCHEDULED", "SENDING", "SENT"))
_MEETING_OUTCOMES = tuple((v, v.replace("_", " ").title()) for v in (
    "SCHEDULED", "COMPLETED", "RESCHEDULED", "NO_SHOW", "CANCELED"))
_TASK_STATUSES = tuple((v, v.replace("_", " ").title()) for v in (
    "NOT_STARTED", "IN_PROGRESS", "WAITING", "COMPLETED", "DEFERRED"))
_TASK_PRIORITIES = tuple((v, v.title()) for v in ("NONE", "LOW", "MEDIUM", "HIGH"))
_TASK_TYPES = (("TODO", "To-do"), ("CALL", "Call"), ("EMAIL", "Email"))
CURRENCIES = (("EUR", "Euro"), ("USD", "US Dollar"), ("GBP", "British Pound"), ("CHF", "Swiss Franc"))
ANALYTICS_SOURCES = tuple((v, v.replace("_", " ").title()) for v in (
    "ORGANIC_SEARCH", "PAID_SEARCH", "EMAIL_MARKETING", "SOCIAL_MEDIA", "REFERRALS", "OTHER_CAMPAIGNS",
    "DIRECT_TRAFFIC", "OFFLINE", "PAID_SOCIAL", "AI_REFERRALS",
))
#: Legacy quote states plus the CPQ ``ACCEPTED`` state (developers.hubspot.com, quotes and CPQ quote guides).
QUOTE_STATES = (
    ("DRAFT", "Draft"), ("APPROVAL_NOT_NEEDED", "Published"), ("PENDING_APPROVAL", "Pending approval"),
    ("APPROVED", "Approved"), ("REJECTED", "Rejected"), ("ACCEPTED", "Accepted"),
)


def _p(name: str, label: str, type_: str = "string", field: str | None = None, group: str = "",
       options: tuple[tuple[str, str], ...] = (), ro: bool = False, calc: bool = False,
       std: bool = True, unique: bool = False) -> PropertyDef:
    default_field = {"string": "text", "number": "number", "date": "date", "datetime": "date",
                     "enumeration": "select", "bool": "booleancheckbox"}[type_]
    if type_ == "bool" and not options:
        options = _BOOL
    return PropertyDef(name, label, type_, field or default_field, group, options, ro, calc, std, unique)


def _common(group: str, modified: str = "hs_lastmodifieddate", created: str = "createdate") -> list[PropertyDef]:
    props = [
        _p("hs_object_id", "Record ID", "number", group=group, ro=True),
        _p(created, "Create Date", "datetime", group=group, ro=True),
        _p(modified, "Last Modified Date", "datetime", group=group, ro=True),
        _p("hubspot_owner_id", "Owner", "enumeration", group=group),
    ]
    if modified != "hs_lastmodifieddate":
        props.append(_p("hs_lastmodifieddate", "Object last modified date/time", "datetime", group=group, ro=True))
    return props


def standard_properties(pipeline_options: tuple[tuple[str, str], ...],
                        stage_options: tuple[tuple[str, str], ...]) -> dict[str, list[PropertyDef]]:
    """The properties every portal starts with, per object type (deal stages depend on the pipelines)."""
    d, c, k, li, pr, q, t = ("dealinformation", "companyinformation", "contactinformation",
                             "lineiteminformation", "productinformation", "quoteinformation", "ticketinformation")
    ca, em, me, ta = "callinformation", "emailinformation", "meetinginformation", "taskinformation"
    return {
        "deals": [
            *_common(d),
            _p("dealname", "Deal Name", group=d),
            _p("amount", "Amount", "number", group=d),
            _p("amount_in_home_currency", "Amount in company currency", "number", group=d, ro=True, calc=True),
            _p("closedate", "Close Date", "datetime", group=d),
            _p("pipeline", "Pipeline", "enumeration", group=d, options=pipeline_options),
            _p("dealstage", "Deal Stage", "enumeration", "radio", group=d, options=stage_options),
            _p("dealtype", "Deal Type", "enumeration", "radio", group=d,
               options=(("newbusiness", "New Business"), ("existingbusiness", "Existing Business"))),
            _p("description", "Deal Description", "string", "textarea", group=d),
            _p("deal_currency_code", "Currency", "enumeration", group=d, options=CURRENCIES),
            _p("hs_is_closed_won", "Is Closed Won", "bool", group=d, ro=True, calc=True),
            _p("hs_is_closed", "Is Deal Closed?", "bool", group=d, ro=True, calc=True),
            _p("hs_deal_stage_probability", "Deal probability", "number", group=d, ro=True, calc=True),
            _p("hs_analytics_source", "Original Source Type", "enumeration", group="analyticsinformation",
               options=ANALYTICS_SOURCES),
        ],
        "companies": [
            *_common(c),
            _p("name", "Company name", group=c),
            _p("domain", "Company Domain Name", group=c),
            _p("website", "Website URL", group=c),
            _p("phone", "Phone Number", group=c),
            _p("address", "Street Address", group=c),
            _p("address2", "Street Address 2", group=c),
            _p("city", "City", group=c),
            _p("zip", "Postal Code", group=c),
            _p("state", "State/Region", group=c),
            _p("country", "Country/Region", group=c),
            _p("industry", "Industry", group=c),
            _p("description", "Description", "string", "textarea", group=c),
            _p("hs_analytics_source", "Original Source Type", "enumeration", group="analyticsinformation",
               options=ANALYTICS_SOURCES),
        ],
        "contacts": [
            *_common(k, modified="lastmodifieddate"),
            _p("firstname", "First Name", group=k),
            _p("lastname", "Last Name", group=k),
            _p("email", "Email", group=k, unique=True),
            _p("phone", "Phone Number", group=k),
            _p("company", "Company Name", group=k),
            _p("jobtitle", "Job Title", group=k),
        ],
        "line_items": [
            *_common(li),
            _p("name", "Name", group=li),
            _p("description", "Description", "string", "textarea", group=li),
            _p("hs_sku", "SKU", group=li),
            _p("quantity", "Quantity", "number", group=li),
            _p("price", "Unit price", "number", group=li),
            _p("amount", "Net price", "number", group=li, ro=True, calc=True),
            _p("discount", "Unit discount", "number", group=li),
            _p("hs_discount_percentage", "Discount Percentage", "number", group=li),
            _p("hs_product_id", "Product ID", "number", group=li),
            _p("hs_line_item_currency_code", "Currency", "enumeration", group=li, options=CURRENCIES),
            _p("hs_position_on_quote", "Position on quote", "number", group=li),
            _p("hs_tax_rate_group_id", "Tax rate", "string", group=li),
        ],
        "products": [
            *_common(pr),
            _p("name", "Name", group=pr),
            _p("description", "Description", "string", "textarea", group=pr),
            _p("price", "Unit price", "number", group=pr),
            _p("hs_sku", "SKU", group=pr),
            _p("hs_product_type", "Product type", "enumeration", group=pr,
               options=(("inventory", "Inventory"), ("non_inventory", "Non-inventory"), ("service", "Service"))),
        ],
        "quotes": [
            *_common(q),
            _p("hs_createdate", "Create date", "datetime", group=q, ro=True),
            _p("hs_title", "Quote Name", group=q),
            _p("hs_expiration_date", "Expiration date", "date", group=q),
            _p("hs_status", "Quote approval status", "enumeration", group=q, options=QUOTE_STATES),
            _p("hs_currency", "Currency", "enumeration", group=q, options=CURRENCIES),
            _p("hs_quote_amount", "Quote amount", "number", group=q, ro=True, calc=True),
            _p("hs_public_url_key", "Public URL key", group=q, ro=True),
            _p("hs_quote_number", "Quote number", group=q),
            _p("hs_esign_enabled", "E-signature enabled", "bool", group=q),
            _p("hs_esign_num_signers_required", "Number of signers required", "number", group=q, ro=True),
            _p("hs_esign_num_signers_completed", "Number of signers who have signed", "number", group=q, ro=True),
            _p("hs_accepted_date", "Accepted date", "datetime", group=q, ro=True),
            _p("hs_payment_enabled", "Payment enabled", "bool", group=q),
        ],
        "tickets": [
            *_common(t),
            _p("subject", "Ticket name", group=t),
            _p("content", "Ticket description", "string", "textarea", group=t),
            _p("hs_pipeline", "Pipeline", "enumeration", group=t, options=(("0", "Support Pipeline"),)),
            _p("hs_pipeline_stage", "Ticket status", "enumeration", group=t,
               options=(("1", "New"), ("2", "Waiting on contact"), ("3", "Waiting on us"), ("4", "Closed"))),
            _p("hs_ticket_category", "Category", "enumeration", group=t,
               options=(("PRODUCT_ISSUE", "Product issue"), ("BILLING_ISSUE", "Billing issue"))),
            _p("hs_ticket_priority", "Priority", "enumeration", group=t,
               options=(("LOW", "Low"), ("MEDIUM", "Medium"), ("HIGH", "High"))),
        ],
        # Engagements carry hs_createdate (no createdate) and hs_timestamp, when the activity happened.
        "calls": [
            *_common(ca, created="hs_createdate"),
            _p("hs_timestamp", "Activity date", "datetime", group=ca),
            _p("hs_call_title", "Call title", group=ca),
            _p("hs_call_body", "Call notes", "string", "html", group=ca),
            _p("hs_call_direction", "Call direction", "enumeration", group=ca, options=_CALL_DIRECTIONS),
            _p("hs_call_duration", "Call duration (ms)", "number", group=ca),
            _p("hs_call_status", "Call status", "enumeration", group=ca, options=_CALL_STATUSES),
        ],
        "emails": [
            *_common(em, created="hs_createdate"),
            _p("hs_timestamp", "Activity date", "datetime", group=em),
            _p("hs_email_subject", "Email subject", group=em),
            _p("hs_email_text", "Email body", "string", "textarea", group=em),
            _p("hs_email_direction", "Email direction", "enumeration", group=em, options=_EMAIL_DIRECTIONS),
            _p("hs_email_status", "Email send status", "enumeration", group=em, options=_EMAIL_STATUSES),
        ],
        "meetings": [
            *_common(me, created="hs_createdate"),
            _p("hs_timestamp", "Activity date", "datetime", group=me),
            _p("hs_meeting_title", "Meeting name", group=me),
            _p("hs_meeting_body", "Meeting description", "string", "html", group=me),
            _p("hs_meeting_start_time", "Start time", "datetime", group=me),
            _p("hs_meeting_end_time", "End time", "datetime", group=me),
            _p("hs_meeting_location", "Location", group=me),
            _p("hs_meeting_outcome", "Meeting outcome", "enumeration", group=me, options=_MEETING_OUTCOMES),
        ],
        "tasks": [
            *_common(ta, created="hs_createdate"),
            _p("hs_timestamp", "Due date", "datetime", group=ta),
            _p("hs_task_subject", "Task title", group=ta),
            _p("hs_task_body", "Task notes", "string", "html", group=ta),
            _p("hs_task_status", "Task status", "enumeration", group=ta, options=_TASK_STATUSES),
            _p("hs_task_priority", "Priority", "enumeration", group=ta, options=_TASK_PRIORITIES),
            _p("hs_task_type", "Task type", "enumeration", group=ta, options=_TASK_TYPES),
        ],
    }


#: Properties returned when a request names none (plus hs_object_id, createdate, hs_lastmodifieddate).
DEFAULT_PROPERTIES: dict[str, tuple[str, ...]] = {
    "deals": ("dealname", "amount", "closedate", "pipeline", "dealstage"),
    "contacts": ("firstname", "lastname", "email", "lastmodifieddate"),
    "companies": ("name", "domain"),
    "products": ("name", "description", "price"),
    "line_items": ("name", "quantity", "price", "amount"),
    "quotes": ("hs_title", "hs_expiration_date", "hs_createdate", "hs_status"),
    "tickets": ("subject", "content", "hs_pipeline", "hs_pipeline_stage"),
    "calls": ("hs_createdate",),
    "emails": ("hs_createdate",),
    "meetings": ("hs_createdate",),
    "tasks": ("hs_createdate",),
}

#: Property groups every portal has, per object type.
STANDARD_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "deals": (("dealinformation", "Deal information"), ("analyticsinformation", "Analytics information")),
    "companies": (("companyinformation", "Company information"),
                  ("analyticsinformation", "Analytics information")),
    "contacts": (("contactinformation", "Contact information"),),
    "line_items": (("lineiteminformation", "Line item information"),),
    "products": (("productinformation", "Product information"),),
    "quotes": (("quoteinformation", "Quote information"),),
    "tickets": (("ticketinformation", "Ticket information"),),
    "calls": (("callinformation", "Call information"),),
    "emails": (("emailinformation", "Email information"),),
    "meetings": (("meetinginformation", "Meeting information"),),
    "tasks": (("taskinformation", "Task information"),),
}
