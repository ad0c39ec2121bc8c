"""A seeded, vendor-neutral CRM book of a French SME, loaded into any CRM sandbox.

:func:`generate_book` returns the same :class:`Book` for the same arguments. The book holds a fixed
product catalogue (:data:`PRODUCTS`), companies (mostly French, with valid SIREN, SIRET and VAT numbers;
some in other EU countries; the USD ones in the United States) and deals with their lines and, for some,
a quote, and the sales activities logged on each deal (:func:`deal_activities`: calls, meetings, e-mails and
tasks, drawn from a random stream of their own so that adding them changed nothing else in the book).

Invariant: a deal's ``amount`` is the sum over its *effective* lines (the quote's lines when the quote was
accepted by the customer, the deal's own lines otherwise) of
``round_money(quantity * unit_price * (100 - discount_percent) / 100, currency)``.

Timestamps are spread over eighteen months after :data:`BOOK_EPOCH`, in whole milliseconds (the CRM
precision), and groups of deals share the very same ``updated_at`` (a bulk import, a workflow run), so a
sync's tie-breaking on equal timestamps is exercised.

Identifiers are book identifiers (``C00001``, ``D00001``, ``Q00001``); each CRM sandbox assigns its own
vendor-style identifiers and keeps the book identifier in a property.
"""

from __future__ import annotations

import datetime as dt
import random
import unicodedata
from dataclasses import dataclass, replace
from decimal import Decimal

from connectors.domain import round_money

__all__ = [
    "ACQUISITION_SOURCES",
    "ACTIVITY_KINDS",
    "BOOK_EPOCH",
    "OWNERS",
    "PRODUCTS",
    "QUOTE_STATUSES",
    "STAGES",
    "TAX_RATES",
    "Book",
    "BookActivity",
    "BookCompany",
    "BookDeal",
    "BookLine",
    "BookProduct",
    "BookQuote",
    "be_vat_valid",
    "de_vat_valid",
    "deal_activities",
    "deal_lines_total",
    "effective_lines",
    "fr_vat_key",
    "generate_book",
    "luhn_valid",
]


@dataclass(frozen=True)
class BookProduct:
    sku: str
    name: str
    unit_price: Decimal
    tax_rate: Decimal


@dataclass(frozen=True)
class BookCompany:
    id: str
    name: str
    domain: str | None
    email: str | None
    vat_number: str | None
    siren: str | None
    siret: str | None
    country: str  # ISO-3166 alpha-2
    currency: str
    address: str
    city: str
    postal_code: str
    acquisition_source: str


@dataclass(frozen=True)
class BookLine:
    sku: str
    description: str
    quantity: Decimal
    unit_price: Decimal
    discount_percent: Decimal
    tax_rate: Decimal


@dataclass(frozen=True)
class BookQuote:
    id: str
    status: str  # 'accepted' | 'sent' | 'draft' | 'rejected'
    lines: tuple[BookLine, ...]


@dataclass(frozen=True)
class BookDeal:
    id: str
    name: str
    company_id: str
    is_won: bool
    is_closed: bool
    stage: str
    amount: Decimal
    currency: str
    close_date: dt.date | None
    created_at: dt.datetime
    updated_at: dt.datetime
    owner: str
    acquisition_source: str
    lines: tuple[BookLine, ...]
    quote: BookQuote | None


@dataclass(frozen=True)
class BookActivity:
    """A sales activity logged on a deal: a call, a meeting, an e-mail or a task."""

    kind: str  # one of ACTIVITY_KINDS
    at: dt.datetime  # within [deal.created_at, deal.updated_at], whole milliseconds
    subject: str
    duration_minutes: int  # calls and meetings; 0 for e-mails and tasks


@dataclass(frozen=True)
class Book:
    products: tuple[BookProduct, ...]
    companies: tuple[BookCompany, ...]
    deals: tuple[BookDeal, ...]
    #: The seed the book was generated from; it also seeds each deal's activities (:func:`deal_activities`).
    seed: int = 0

    def activities(self, deal: BookDeal) -> tuple[BookActivity, ...]:
        """The sales activities logged on ``deal`` (see :func:`deal_activities`)."""
        return deal_activities(self.seed, deal)

    def company(self, company_id: str) -> BookCompany:
        for c in self.companies:
            if c.id == company_id:
                return c
        raise KeyError(company_id)

    def deal(self, deal_id: str) -> BookDeal:
        for d in self.deals:
            if d.id == deal_id:
                return d
        raise KeyError(deal_id)


TAX_RATES = (Decimal("20"), Decimal("10"), Decimal("5.5"), Decimal("2.1"))

#: Vendor-neutral deal stages; ``won`` and ``lost`` are closed.
STAGES = ("prospect", "qualified", "proposal", "negotiation", "won", "lost")
_OPEN_STAGES = STAGES[:4]

QUOTE_STATUSES = ("accepted", "sent", "draft", "rejected")

#: Acquisition channels, in the lower-case spelling of HubSpot's "original source" values.
ACQUISITION_SOURCES = (
    "organic_search", "paid_search", "email_marketing", "social_media", "referrals", "direct_traffic",
    "offline", "paid_social", "other_campaigns",
)

#: The sales team (deal owners).
OWNERS = (
    "camille.martin@atelier-numerique.fr",
    "julien.petit@atelier-numerique.fr",
    "sophie.bernard@atelier-numerique.fr",
    "nicolas.roux@atelier-numerique.fr",
    "claire.fontaine@atelier-numerique.fr",
)

#: First day of the book; every timestamp falls within about eighteen months after it.
BOOK_EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)

_D = Decimal

#: The fixed catalogue of an IT services and equipment SME. SKUs are stable.
PRODUCTS: tuple[BookProduct, ...] = (
    BookProduct("SVC-CONSULT-DAY", "Journée de conseil", _D("850.00"), _D("20")),
    BookProduct("SVC-DEV-DAY", "Journée de développement", _D("720.00"), _D("20")),
    BookProduct("SVC-PROJECT-MGMT", "Pilotage de projet (forfait)", _D("1450.00"), _D("20")),
    BookProduct("SVC-SUPPORT-YEAR", "Contrat de support annuel", _D("2400.00"), _D("20")),
    BookProduct("SVC-TRAINING", "Formation inter-entreprises (par participant)", _D("1290.00"), _D("20")),
    BookProduct("SVC-TRAVEL", "Frais de déplacement (forfait)", _D("150.00"), _D("20")),
    BookProduct("LIC-SAAS-USER", "Abonnement logiciel (par utilisateur et par mois)", _D("39.90"), _D("20")),
    BookProduct("HW-LAPTOP-14", "Ordinateur portable 14 pouces", _D("1149.00"), _D("20")),
    BookProduct("HW-SCREEN-27", "Écran 27 pouces", _D("289.00"), _D("20")),
    BookProduct("HW-DOCK-USBC", "Station d'accueil USB-C", _D("179.00"), _D("20")),
    BookProduct("CAT-LUNCH-TRAY", "Plateau-repas (traiteur)", _D("18.50"), _D("10")),
    BookProduct("CAT-SEMINAR-DAY", "Forfait séminaire journée", _D("65.00"), _D("10")),
    BookProduct("WORKS-FITOUT-M2", "Travaux d'aménagement de bureaux (m²)", _D("95.00"), _D("10")),
    BookProduct("BOOK-GUIDE", "Guide pratique de la transformation numérique (ouvrage)", _D("34.00"), _D("5.5")),
    BookProduct("WORKS-INSUL-M2", "Isolation thermique des locaux (m²)", _D("42.00"), _D("5.5")),
    BookProduct("PRESS-SUB-YEAR", "Abonnement annuel à la presse professionnelle", _D("189.00"), _D("2.1")),
)

# How often each product is sold (20 % products dominate) and the quantities it is sold in.
_PRODUCT_WEIGHTS = (14, 12, 6, 6, 5, 5, 8, 8, 6, 5, 4, 3, 3, 3, 2, 2)
_QUANTITIES: dict[str, tuple[str, ...]] = {
    "SVC-CONSULT-DAY": ("0.5", "1", "2", "3", "5", "8", "10", "12.5"),
    "SVC-DEV-DAY": ("1", "2", "5", "10", "15", "20", "22.5", "40"),
    "SVC-PROJECT-MGMT": ("1",),
    "SVC-SUPPORT-YEAR": ("1", "1", "2"),
    "SVC-TRAINING": ("1", "2", "3", "4", "6", "8"),
    "SVC-TRAVEL": ("1", "2", "3", "4"),
    "LIC-SAAS-USER": ("5", "10", "12", "25", "36", "50", "120"),
    "HW-LAPTOP-14": ("1", "2", "3", "5", "8", "12", "20"),
    "HW-SCREEN-27": ("1", "2", "4", "6", "10", "16"),
    "HW-DOCK-USBC": ("1", "2", "4", "6", "10"),
    "CAT-LUNCH-TRAY": ("8", "12", "15", "20", "35", "60"),
    "CAT-SEMINAR-DAY": ("10", "15", "25", "40"),
    "WORKS-FITOUT-M2": ("12", "25", "40", "75.5", "120"),
    "BOOK-GUIDE": ("1", "5", "10", "25", "50"),
    "WORKS-INSUL-M2": ("30", "45.5", "80", "150"),
    "PRESS-SUB-YEAR": ("1", "2", "3", "5"),
}
_DISCOUNTS = ("5", "7.5", "10", "12", "15", "20")
_USD_PER_EUR = Decimal("1.08")

_FR_SURNAMES = (
    "Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau",
    "Simon", "Laurent", "Lefebvre", "Michel", "Garcia", "David", "Bertrand", "Roux", "Vincent", "Fournier",
    "Morel", "Girard", "André", "Lefèvre", "Mercier", "Dupont", "Lambert", "Bonnet", "François", "Martinez",
    "Legrand", "Garnier", "Faure", "Rousseau", "Blanc", "Guérin", "Muller", "Henry", "Roussel", "Nicolas",
    "Perrin", "Morin", "Mathieu", "Clément", "Gauthier", "Dumont", "Lopez", "Fontaine", "Chevalier", "Robin",
)
_FR_ACTIVITIES = (
    "Atelier", "Boulangerie", "Cabinet", "Groupe", "Transports", "Imprimerie", "Menuiserie", "Laboratoires",
    "Éditions", "Garage", "Brasserie", "Clinique vétérinaire", "Agence", "Pharmacie", "Domaine", "Fromagerie",
    "Bureau d'études", "Architectes", "Maison", "Établissements",
)
_FR_FORMS = ("SARL", "SAS", "SA", "& Fils", "et Associés", "EURL", "SASU", "")
_FR_CITIES = (
    ("Paris", "75011"), ("Paris", "75015"), ("Lyon", "69003"), ("Marseille", "13008"), ("Toulouse", "31000"),
    ("Nice", "06000"), ("Nantes", "44000"), ("Strasbourg", "67000"), ("Montpellier", "34000"),
    ("Bordeaux", "33000"), ("Lille", "59000"), ("Rennes", "35000"), ("Reims", "51100"), ("Grenoble", "38000"),
    ("Dijon", "21000"), ("Angers", "49000"), ("Brest", "29200"), ("Tours", "37000"), ("Limoges", "87000"),
    ("Clermont-Ferrand", "63000"), ("Rouen", "76000"), ("Annecy", "74000"), ("Besançon", "25000"),
    ("Perpignan", "66000"), ("Orléans", "45000"), ("Caen", "14000"), ("Metz", "57000"), ("Pau", "64000"),
)
_FR_STREETS = (
    "rue de la République", "avenue Jean Jaurès", "boulevard Victor Hugo", "place du Marché",
    "allée des Tilleuls", "rue Pasteur", "rue du Général de Gaulle", "quai des Chartrons", "rue Nationale",
    "impasse des Lilas", "chemin des Vignes", "rue de la Gare", "avenue de la Libération", "cours Mirabeau",
)
_EU = {
    "DE": (("Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Wagner", "Becker", "Hoffmann"),
           ("GmbH", "AG", "KG"), (("Berlin", "10115"), ("München", "80331"), ("Hamburg", "20095")),
           ("Hauptstraße", "Bahnhofstraße", "Gartenweg"), "de"),
    "BE": (("Peeters", "Janssens", "Maes", "Jacobs", "Mertens", "Willems"),
           ("SRL", "BV", "SA"), (("Bruxelles", "1000"), ("Liège", "4000"), ("Gent", "9000")),
           ("rue Royale", "Kerkstraat", "avenue Louise"), "be"),
    "ES": (("García", "Fernández", "López", "Martínez", "Sánchez", "Pérez"),
           ("S.L.", "S.A."), (("Madrid", "28001"), ("Barcelona", "08001"), ("Valencia", "46001")),
           ("Calle Mayor", "Gran Vía", "Calle de Alcalá"), "es"),
    "IT": (("Rossi", "Russo", "Ferrari", "Esposito", "Bianchi", "Romano"),
           ("S.r.l.", "S.p.A."), (("Milano", "20121"), ("Torino", "10121"), ("Roma", "00184")),
           ("Via Roma", "Corso Italia", "Via Garibaldi"), "it"),
}
_US_SURNAMES = ("Walker", "Harris", "Carter", "Mitchell", "Turner", "Parker", "Collins", "Reed", "Hughes", "Price")
_US_KINDS = ("Industries", "Labs", "Partners", "Logistics", "Studios", "Systems", "Foods", "Health")
_US_CITIES = (
    ("New York", "10001"), ("Boston", "02110"), ("Austin", "78701"), ("Chicago", "60601"),
    ("San Francisco", "94105"), ("Seattle", "98101"),
)
_US_STREETS = ("Market Street", "Main Street", "Broadway", "Congress Avenue", "Pine Street")
_DEAL_TOPICS = (
    "Renouvellement du parc informatique", "Refonte du site web", "Migration vers le cloud",
    "Formation des équipes", "Contrat de maintenance", "Déploiement logiciel", "Séminaire annuel",
    "Aménagement des nouveaux locaux", "Audit de sécurité", "Équipement télétravail",
    "Abonnements documentation", "Accompagnement transformation numérique",
)


# -- identifiers with check digits ----------------------------------------------------------------

def _luhn_sum(digits: str) -> int:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total


def luhn_valid(number: str) -> bool:
    """True when ``number`` (digits only) passes the Luhn check (SIREN, SIRET, Italian VAT numbers)."""
    return number.isdigit() and _luhn_sum(number) % 10 == 0


def _luhn_complete(payload: str) -> str:
    for check in "0123456789":
        if luhn_valid(payload + check):
            return payload + check
    raise AssertionError("unreachable")  # pragma: no cover


def fr_vat_key(siren: str) -> int:
    """The two-digit key of a French VAT number: ``(12 + 3 * (SIREN mod 97)) mod 97``."""
    return (12 + 3 * (int(siren) % 97)) % 97


def _de_check_digit(payload: str) -> int:
    # ISO 7064 MOD 11,10, as used by German VAT numbers (USt-IdNr.).
    product = 10
    for ch in payload:
        total = (int(ch) + product) % 10
        if total == 0:
            total = 10
        product = (2 * total) % 11
    check = 11 - product
    return 0 if check == 10 else check


def de_vat_valid(vat: str) -> bool:
    """True for ``DE`` + 9 digits whose last digit is the ISO 7064 MOD 11,10 check digit."""
    body = vat.removeprefix("DE")
    return len(body) == 9 and body.isdigit() and int(body[-1]) == _de_check_digit(body[:8])


def be_vat_valid(vat: str) -> bool:
    """True for ``BE`` + 10 digits whose last two digits are ``97 - (first eight mod 97)``."""
    body = vat.removeprefix("BE")
    return len(body) == 10 and body.isdigit() and int(body[8:]) == 97 - int(body[:8]) % 97


def _es_cif_control(digits: str) -> int:
    even = sum(int(digits[i]) for i in (1, 3, 5))
    odd = 0
    for i in (0, 2, 4, 6):
        d = int(digits[i]) * 2
        odd += d // 10 + d % 10
    return (10 - (even + odd) % 10) % 10


def _vat_for(rng: random.Random, country: str) -> str:
    if country == "DE":
        payload = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(7))
        return f"DE{payload}{_de_check_digit(payload)}"
    if country == "BE":
        first8 = "0" + str(rng.randint(2, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(6))
        return f"BE{first8}{97 - int(first8) % 97:02d}"
    if country == "ES":
        digits = "".join(str(rng.randint(0, 9)) for _ in range(7))
        return f"ESB{digits}{_es_cif_control(digits)}"
    if country == "IT":
        payload = "".join(str(rng.randint(0, 9)) for _ in range(7)) + f"{rng.randint(1, 100):03d}"
        return "IT" + _luhn_complete(payload)
    raise ValueError(country)


def _siren(rng: random.Random, used: set[str]) -> str:
    while True:
        payload = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(7))
        siren = _luhn_complete(payload)
        if siren not in used:
            used.add(siren)
            return siren


# -- helpers --------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    out = []
    for ch in ascii_text.lower():
        if ch.isalnum():
            out.append(ch)
        elif out and out[-1] != "-":
            out.append("-")
    return "".join(out).strip("-")


def _ms(value: dt.datetime) -> dt.datetime:
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _line_net(line: BookLine, currency: str) -> Decimal:
    gross = line.quantity * line.unit_price
    return round_money(gross * (Decimal(100) - line.discount_percent) / Decimal(100), currency)


def deal_lines_total(lines: tuple[BookLine, ...], currency: str) -> Decimal:
    """Sum of the rounded net amounts of ``lines``."""
    return sum((_line_net(ln, currency) for ln in lines), Decimal(0))


def effective_lines(deal: BookDeal) -> tuple[BookLine, ...]:
    """The lines an invoice carries: the accepted quote's lines, or else the deal's own."""
    if deal.quote is not None and deal.quote.status == "accepted":
        return deal.quote.lines
    return deal.lines


# -- generation -----------------------------------------------------------------------------------

def _company_name(rng: random.Random, country: str, used: set[str], city: str) -> str:
    for attempt in range(50):
        if country == "FR":
            activity = rng.choice(_FR_ACTIVITIES)
            surname = rng.choice(_FR_SURNAMES)
            form = rng.choice(_FR_FORMS)
            name = f"{activity} {surname}" + (f" {form}" if form else "")
        elif country == "US":
            name = f"{rng.choice(_US_SURNAMES)} {rng.choice(_US_KINDS)} Inc."
        else:
            surnames, forms, _cities, _streets, _tld = _EU[country]
            name = f"{rng.choice(surnames)} {rng.choice(('Consulting', 'Handel', 'Technik', 'Studio', 'Group'))}"
            name += f" {rng.choice(forms)}"
        if attempt >= 3:
            name = f"{name} ({city})" if attempt < 6 else f"{name} {attempt}"
        if name not in used:
            used.add(name)
            return name
    raise AssertionError("could not find a unique company name")  # pragma: no cover


def _make_companies(rng: random.Random, n: int, usd_share: float) -> list[BookCompany]:
    n_us = round(n * usd_share)
    n_eu = round(n * 0.1)
    countries = ["US"] * n_us + [rng.choice(sorted(_EU)) for _ in range(n_eu)]
    countries += ["FR"] * (n - len(countries))
    rng.shuffle(countries)
    names: set[str] = set()
    sirens: set[str] = set()
    domains: set[str] = set()
    out: list[BookCompany] = []
    width = max(5, len(str(n)))
    for i, country in enumerate(countries, start=1):
        siren = siret = vat = None
        currency = "EUR"
        if country == "FR":
            city, postal = rng.choice(_FR_CITIES)
            address = f"{rng.randint(1, 180)} {rng.choice(_FR_STREETS)}"
            siren = _siren(rng, sirens)
            siret = _luhn_complete(siren + f"{rng.randint(1, 99):04d}")
            vat = f"FR{fr_vat_key(siren):02d}{siren}"
            tld = "fr"
        elif country == "US":
            city, postal = rng.choice(_US_CITIES)
            address = f"{rng.randint(10, 2400)} {rng.choice(_US_STREETS)}"
            currency = "USD"
            tld = "com"
        else:
            _s, _f, cities, streets, tld = _EU[country]
            city, postal = rng.choice(cities)
            address = f"{rng.choice(streets)} {rng.randint(1, 90)}"
            vat = _vat_for(rng, country)
        name = _company_name(rng, country, names, city)
        domain: str | None = None
        if rng.random() >= 0.12:
            base = _slug(name.split(" (")[0])
            domain = f"{base}.{tld}"
            k = 2
            while domain in domains:
                domain = f"{base}-{k}.{tld}"
                k += 1
            domains.add(domain)
        email: str | None
        if domain:
            email = f"{rng.choice(('contact', 'compta', 'factures', 'admin', 'finance'))}@{domain}"
        elif rng.random() < 0.5:
            email = f"{_slug(name)[:30]}@{rng.choice(('orange.fr', 'gmail.com', 'free.fr'))}"
        else:
            email = None
        out.append(BookCompany(
            id=f"C{i:0{width}d}", name=name, domain=domain, email=email, vat_number=vat, siren=siren,
            siret=siret, country=country, currency=currency, address=address, city=city, postal_code=postal,
            acquisition_source=rng.choice(ACQUISITION_SOURCES),
        ))
    return out


def _make_line(rng: random.Random, currency: str) -> BookLine:
    product = rng.choices(PRODUCTS, weights=_PRODUCT_WEIGHTS)[0]
    price = product.unit_price
    if currency == "USD":
        price = round_money(price * _USD_PER_EUR, "USD")
    if rng.random() < 0.1:  # a negotiated price
        price = round_money(price * Decimal("0.95"), currency)
    discount = Decimal(rng.choice(_DISCOUNTS)) if rng.random() < 0.3 else Decimal(0)
    description = product.name
    if rng.random() < 0.15:
        description += rng.choice((" – site principal", " – phase 2", " – filiale", " (renouvellement)"))
    return BookLine(
        sku=product.sku, description=description, quantity=Decimal(rng.choice(_QUANTITIES[product.sku])),
        unit_price=price, discount_percent=discount, tax_rate=product.tax_rate,
    )


def _vary_lines(rng: random.Random, lines: tuple[BookLine, ...], currency: str) -> tuple[BookLine, ...]:
    """Lines that differ from ``lines`` (a negotiated quote): quantities, discounts, lines added/removed."""
    while True:
        out = list(lines)
        if out and rng.random() < 0.6:
            i = rng.randrange(len(out))
            out[i] = replace(out[i], quantity=out[i].quantity + Decimal(rng.choice(("1", "2", "0.5", "5"))))
        if out and rng.random() < 0.5:
            i = rng.randrange(len(out))
            out[i] = replace(out[i], discount_percent=Decimal(rng.choice(_DISCOUNTS)))
        if rng.random() < 0.4:
            out.append(_make_line(rng, currency))
        if len(out) > 1 and rng.random() < 0.25:
            out.pop(rng.randrange(len(out)))
        if tuple(out) != lines and out:
            return tuple(out)


@dataclass
class _Draft:
    id: str
    company: BookCompany
    stage: str
    created: dt.datetime
    updated: dt.datetime
    lines: tuple[BookLine, ...]
    quote: BookQuote | None
    owner: str
    source: str
    topic: str


def generate_book(
    seed: int = 0,
    *,
    companies: int = 300,
    deals: int = 600,
    won_share: float = 0.45,
    usd_share: float = 0.1,
    lines_per_deal: int | None = None,
) -> Book:
    """The book for ``seed``: ``companies`` companies and ``deals`` deals, identical for identical arguments."""
    if companies < 1 and deals:
        raise ValueError("a book with deals needs at least one company")
    if not 0 <= won_share <= 1 or not 0 <= usd_share <= 1:
        raise ValueError("won_share and usd_share must be within [0, 1]")
    rng = random.Random(f"ledgerbridge-book-{seed}")
    comps = _make_companies(rng, companies, usd_share)
    width = max(5, len(str(deals)))
    span_ms = 540 * 86_400_000
    raw: list[_Draft] = []
    for i in range(1, deals + 1):
        company = rng.choice(comps)
        currency = company.currency
        r = rng.random()
        if r < won_share:
            stage = "won"
        elif r < won_share + (1 - won_share) * 0.35:
            stage = "lost"
        else:
            stage = rng.choice(_OPEN_STAGES)
        created = BOOK_EPOCH + dt.timedelta(milliseconds=rng.randrange(span_ms))
        updated = created + dt.timedelta(milliseconds=rng.randrange(3_600_000, 90 * 86_400_000))
        n_lines = lines_per_deal if lines_per_deal is not None else rng.choices((1, 2, 3, 4, 5, 6),
                                                                                   weights=(20, 25, 22, 15, 10, 8))[0]
        lines = tuple(_make_line(rng, currency) for _ in range(n_lines))
        quote: BookQuote | None = None
        q = rng.random()
        qid = f"Q{i:0{width}d}"
        if stage == "won" and lines:
            if q < 0.2:
                quote = BookQuote(qid, "accepted", _vary_lines(rng, lines, currency))
            elif q < 0.3:
                quote = BookQuote(qid, "sent", _vary_lines(rng, lines, currency))
        elif stage == "lost" and q < 0.2 and lines:
            quote = BookQuote(qid, "rejected", lines)
        elif stage in _OPEN_STAGES and q < 0.3 and lines:
            quote = BookQuote(qid, rng.choice(("draft", "sent")),
                              lines if rng.random() < 0.5 else _vary_lines(rng, lines, currency))
        source = company.acquisition_source if rng.random() < 0.8 else rng.choice(ACQUISITION_SOURCES)
        raw.append(_Draft(f"D{i:0{width}d}", company, stage, created, updated, lines, quote, rng.choice(OWNERS),
                          source, rng.choice(_DEAL_TOPICS)))

    # Shared modification timestamps: one bulk update touching many deals, and smaller workflow runs.
    if raw:
        clusters = [max(25, deals // 8)] + [rng.randint(2, 12) for _ in range(max(deals // 40, 1))]
        for size in clusters:
            at = BOOK_EPOCH + dt.timedelta(milliseconds=rng.randrange(120 * 86_400_000, span_ms + 60 * 86_400_000))
            eligible = [d for d in raw if d.created < at]
            for d in rng.sample(eligible, min(size, len(eligible))):
                d.updated = at

    out: list[BookDeal] = []
    for d in raw:
        company = d.company
        created, updated = _ms(d.created), _ms(d.updated)
        is_closed = d.stage in ("won", "lost")
        close_date: dt.date | None
        if is_closed:
            close_date = max(updated.date() - dt.timedelta(days=rng.randint(0, 10)), created.date())
        elif rng.random() < 0.15:
            close_date = None
        else:
            close_date = created.date() + dt.timedelta(days=rng.randint(30, 120))
        effective = d.quote.lines if d.quote is not None and d.quote.status == "accepted" else d.lines
        out.append(BookDeal(
            id=d.id, name=f"{company.name.split(' (')[0]} – {d.topic}", company_id=company.id,
            is_won=d.stage == "won", is_closed=is_closed, stage=d.stage,
            amount=deal_lines_total(effective, company.currency), currency=company.currency,
            close_date=close_date, created_at=created, updated_at=updated, owner=d.owner,
            acquisition_source=d.source, lines=d.lines, quote=d.quote,
        ))
    return Book(products=PRODUCTS, companies=tuple(comps), deals=tuple(out), seed=seed)


# -- sales activities -----------------------------------------------------------------------------

#: Kinds of sales activity, as :meth:`connectors.interfaces.CrmSource.activity_counts` counts them.
ACTIVITY_KINDS = ("call", "meeting", "email", "task")
_ACTIVITY_WEIGHTS = (30, 15, 35, 20)
#: How many activities a deal gets, by stage: (fewest, most).
_ACTIVITY_SPAN = {"prospect": (0, 3), "qualified": (1, 4), "proposal": (1, 6), "negotiation": (2, 8),
                  "won": (3, 10), "lost": (1, 6)}
_ACTIVITY_SUBJECTS = {
    "call": ("Appel de découverte", "Appel de qualification", "Point téléphonique", "Relance téléphonique"),
    "meeting": ("Rendez-vous de présentation", "Démonstration", "Atelier de cadrage", "Réunion de négociation"),
    "email": ("Envoi de la proposition", "Relance du devis", "Compte rendu de réunion", "Envoi de la documentation"),
    "task": ("Préparer la proposition", "Mettre à jour le devis", "Vérifier le budget", "Planifier la relance"),
}


def deal_activities(seed: int, deal: BookDeal) -> tuple[BookActivity, ...]:
    """The sales activities logged on ``deal`` of the book generated from ``seed``, oldest first.

    Drawn from their own random stream (one per deal), so the book's deals do not depend on them: the same
    deal of the same seed always has the same activities. Won deals get the most, prospects the fewest; every
    activity falls between the deal's creation and its last modification.
    """
    rng = random.Random(f"ledgerbridge-activities-{seed}-{deal.id}")
    low, high = _ACTIVITY_SPAN.get(deal.stage, (0, 4))
    span_ms = max((deal.updated_at - deal.created_at) // dt.timedelta(milliseconds=1), 0)
    out: list[BookActivity] = []
    for _ in range(rng.randint(low, high)):
        kind = rng.choices(ACTIVITY_KINDS, weights=_ACTIVITY_WEIGHTS)[0]
        at = deal.created_at + dt.timedelta(milliseconds=rng.randint(0, span_ms))
        minutes = {"call": rng.choice((5, 10, 15, 20, 30)), "meeting": rng.choice((30, 45, 60, 90, 120))}.get(kind, 0)
        out.append(BookActivity(kind, at, rng.choice(_ACTIVITY_SUBJECTS[kind]), minutes))
    out.sort(key=lambda a: a.at)
    return tuple(out)
