"""A generic extraction curriculum for pre-training the demo base model: documents that are not
invoices, each paired with a JSON answer, so the model learns to read and copy before any
adapter teaches it a task.

A real open-weight base model arrives knowing how to find "the value after this label" in a
document, copy a name token by token, rewrite ``15.03.2026`` as ``2026-03-15`` and ``1.234,56 €``
as ``1234.56``. A model of a few million parameters pre-trained for minutes on raw text learns
none of it, and then no short LoRA run can teach extraction. This module writes the kind of
instruction data such a model would have seen: delivery notes, purchase orders, payslips, hotel
bookings and bank transfers in English, German, French, Dutch and Spanish, in several layouts
(labelled lines, a sentence, a table, a letterhead), with distractor fields and fields that are
asked for but absent (``null``).

What it never holds is an invoice: no document kind here is an invoice, reminder or receipt, and
no key is one of the invoice task's output keys except the generic ``currency``. Mapping an
invoice to ``vendor``/``invoice_number``/``date``/``total``/``vat_id`` is what the adapter learns.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from tuneloop.demo.invoice_documents import (
    _address,
    _company,
    _format_date,
    _number,
    _random_date,
    _vat_id,
)
from tuneloop.demo.invoice_locales import _LOCALES

LANGUAGE = {"us": "en", "uk": "en", "de": "de", "fr": "fr", "nl": "nl", "es": "es"}


@dataclass(frozen=True)
class _Field:
    key: str
    kind: str  # company | person | code | date | amount | currency | count | tax_id | city
    labels: dict[str, str]  # language -> label
    optional: bool = False  # may be missing from the document (answer null)


def _f(key: str, kind: str, en: str, de: str, fr: str, nl: str, es: str, optional: bool = False) -> _Field:
    return _Field(key, kind, {"en": en, "de": de, "fr": fr, "nl": nl, "es": es}, optional)


@dataclass(frozen=True)
class _Kind:
    key: str  # the document kind as the instruction names it
    titles: dict[str, str]
    issuer: str  # the field that a letterhead may print without a label
    fields: tuple[_Field, ...]


# fmt: off
KINDS: tuple[_Kind, ...] = (
    _Kind("delivery note", {"en": "DELIVERY NOTE", "de": "LIEFERSCHEIN", "fr": "BON DE LIVRAISON", "nl": "PAKBON", "es": "ALBARÁN"},
          "shipper", (
        _f("shipper", "company", "Shipper", "Versender", "Expéditeur", "Verzender", "Remitente"),
        _f("consignee", "company", "Deliver to", "Empfänger", "Destinataire", "Ontvanger", "Destinatario"),
        _f("delivery_number", "code", "Delivery No.", "Lieferschein-Nr.", "N° de livraison", "Pakbonnummer", "N.º de albarán"),
        _f("ship_date", "date", "Ship date", "Versanddatum", "Date d'expédition", "Verzenddatum", "Fecha de envío"),
        _f("carrier", "company", "Carrier", "Spediteur", "Transporteur", "Vervoerder", "Transportista", optional=True),
        _f("parcels", "count", "Parcels", "Packstücke", "Colis", "Colli", "Bultos"),
        _f("origin_city", "city", "Dispatched from", "Versandort", "Lieu d'expédition", "Verzonden vanuit", "Origen"),
    )),
    _Kind("purchase order", {"en": "PURCHASE ORDER", "de": "BESTELLUNG", "fr": "BON DE COMMANDE", "nl": "INKOOPORDER", "es": "PEDIDO DE COMPRA"},
          "buyer", (
        _f("buyer", "company", "Ordered by", "Besteller", "Acheteur", "Besteld door", "Comprador"),
        _f("supplier", "company", "Order to", "Lieferant", "Fournisseur", "Leverancier", "Proveedor"),
        _f("order_number", "code", "PO No.", "Bestell-Nr.", "N° de commande", "Ordernummer", "N.º de pedido"),
        _f("order_date", "date", "Order date", "Bestelldatum", "Date de commande", "Orderdatum", "Fecha del pedido"),
        _f("delivery_date", "date", "Deliver by", "Liefertermin", "Livraison souhaitée", "Leverdatum", "Entrega", optional=True),
        _f("currency", "currency", "Currency", "Währung", "Devise", "Valuta", "Moneda"),
        _f("order_value", "amount", "Order value", "Bestellwert", "Montant de la commande", "Orderwaarde", "Importe del pedido"),
        _f("buyer_tax_id", "tax_id", "Buyer tax ID", "USt-IdNr. Besteller", "N° TVA acheteur", "Btw-nummer koper", "NIF comprador", optional=True),
    )),
    _Kind("payslip", {"en": "PAYSLIP", "de": "GEHALTSABRECHNUNG", "fr": "BULLETIN DE PAIE", "nl": "LOONSTROOK", "es": "NÓMINA"},
          "employer", (
        _f("employer", "company", "Employer", "Arbeitgeber", "Employeur", "Werkgever", "Empresa"),
        _f("employee", "person", "Employee", "Mitarbeiter", "Salarié", "Werknemer", "Trabajador"),
        _f("employee_id", "code", "Employee No.", "Personalnummer", "Matricule", "Personeelsnummer", "N.º de empleado"),
        _f("pay_date", "date", "Pay date", "Auszahlungsdatum", "Date de paiement", "Betaaldatum", "Fecha de pago"),
        _f("gross_pay", "amount", "Gross pay", "Bruttolohn", "Salaire brut", "Brutoloon", "Salario bruto"),
        _f("net_pay", "amount", "Net pay", "Nettolohn", "Net à payer", "Nettoloon", "Líquido a percibir"),
        _f("currency", "currency", "Currency", "Währung", "Devise", "Valuta", "Moneda"),
        _f("employer_tax_id", "tax_id", "Employer tax ID", "Steuernummer Arbeitgeber", "SIRET / TVA", "Loonheffingennummer", "CIF empresa", optional=True),
    )),
    _Kind("hotel booking", {"en": "BOOKING CONFIRMATION", "de": "BUCHUNGSBESTÄTIGUNG", "fr": "CONFIRMATION DE RÉSERVATION", "nl": "BOEKINGSBEVESTIGING", "es": "CONFIRMACIÓN DE RESERVA"},
          "hotel", (
        _f("hotel", "company", "Hotel", "Hotel", "Hôtel", "Hotel", "Hotel"),
        _f("guest", "person", "Guest", "Gast", "Client", "Gast", "Huésped"),
        _f("booking_reference", "code", "Booking ref.", "Buchungsnummer", "Référence", "Boekingsnummer", "Localizador"),
        _f("check_in", "date", "Arrival", "Anreise", "Arrivée", "Aankomst", "Llegada"),
        _f("check_out", "date", "Departure", "Abreise", "Départ", "Vertrek", "Salida"),
        _f("nights", "count", "Nights", "Nächte", "Nuits", "Nachten", "Noches"),
        _f("room_rate", "amount", "Rate per night", "Preis pro Nacht", "Prix par nuit", "Prijs per nacht", "Precio por noche"),
        _f("amount_charged", "amount", "Amount charged", "Abgebuchter Betrag", "Montant débité", "Afgeschreven bedrag", "Importe cargado"),
        _f("currency", "currency", "Currency", "Währung", "Devise", "Valuta", "Moneda"),
    )),
    _Kind("bank transfer", {"en": "TRANSFER CONFIRMATION", "de": "ÜBERWEISUNGSBESTÄTIGUNG", "fr": "AVIS DE VIREMENT", "nl": "BEVESTIGING OVERBOEKING", "es": "JUSTIFICANTE DE TRANSFERENCIA"},
          "payer", (
        _f("payer", "company", "Ordering party", "Auftraggeber", "Donneur d'ordre", "Opdrachtgever", "Ordenante"),
        _f("payee", "company", "Beneficiary", "Empfänger", "Bénéficiaire", "Begunstigde", "Beneficiario"),
        _f("transfer_id", "code", "Transaction ID", "Transaktions-ID", "Référence de l'opération", "Transactiekenmerk", "Referencia de la operación"),
        _f("value_date", "date", "Value date", "Valutadatum", "Date de valeur", "Valutadatum", "Fecha valor"),
        _f("amount", "amount", "Amount", "Betrag", "Montant", "Bedrag", "Importe"),
        _f("fee", "amount", "Fee", "Gebühr", "Frais", "Kosten", "Comisión", optional=True),
        _f("currency", "currency", "Currency", "Währung", "Devise", "Valuta", "Moneda"),
        _f("payee_tax_id", "tax_id", "Beneficiary tax ID", "USt-IdNr. Empfänger", "N° TVA bénéficiaire", "Btw-nummer begunstigde", "NIF beneficiario", optional=True),
    )),
)

_SENTENCES = {
    "en": ("Please find the details below.", "For your records:", "Summary of this document:"),
    "de": ("Nachfolgend die Einzelheiten.", "Zu Ihren Unterlagen:", "Zusammenfassung:"),
    "fr": ("Veuillez trouver le détail ci-dessous.", "Pour vos dossiers :", "Récapitulatif :"),
    "nl": ("Hieronder vindt u de gegevens.", "Voor uw administratie:", "Samenvatting:"),
    "es": ("A continuación, los detalles.", "Para su archivo:", "Resumen del documento:"),
}
_AND = {"en": "and", "de": "und", "fr": "et", "nl": "en", "es": "y"}
# fmt: on

_ISO_DATE_HINT = " (YYYY-MM-DD)"
LAYOUTS = ("lines", "letterhead", "sentence", "table")


def _code(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
    prefix = "".join(rng.choice(letters) for _ in range(rng.randint(1, 3)))
    digits = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 7)))
    return rng.choice((f"{prefix}-{digits}", f"{prefix}{digits}", digits, f"{prefix}/{digits[:2]}/{digits[2:]}"))


def _value(rng: random.Random, field: _Field, locale: Any, money_style: tuple[str, str, bool]) -> tuple[str, Any]:
    """(as printed in the document, as the JSON answer holds it)."""
    if field.kind == "company":
        name = _company(rng, _LOCALES[rng.choice(tuple(_LOCALES))] if rng.random() < 0.3 else locale)
        return name, name
    if field.kind == "person":
        first, last = locale.people
        name = f"{rng.choice(first)} {rng.choice(last)}"
        return name, name
    if field.kind == "code":
        code = _code(rng)
        return code, code
    if field.kind == "date":
        day = _random_date(rng)
        return _format_date(day, rng.choice(locale.date_styles)), day.isoformat()
    if field.kind == "amount":
        cents = rng.choice((rng.randint(100, 99_999), rng.randint(10_000, 2_000_000)))
        prefix, suffix, grouped = money_style
        return prefix + _number(cents, locale, grouped=grouped) + suffix, round(cents / 100, 2)
    if field.kind == "currency":
        return locale.currency, locale.currency
    if field.kind == "count":
        count = rng.randint(1, 40)
        return str(count), count
    if field.kind == "tax_id":
        tax_id = _vat_id(rng, locale)
        return tax_id, tax_id
    if field.kind == "city":
        city = _address(rng, locale)[1]
        return city, city
    raise ValueError(f"unknown field kind {field.kind!r}")


def _render_answer(keys: list[str], answer: dict[str, Any], amounts: set[str]) -> str:
    parts = []
    for key in keys:
        value = answer[key]
        rendered = f"{value:.2f}" if key in amounts and value is not None else json.dumps(value, ensure_ascii=False)
        parts.append(f"{json.dumps(key)}:{rendered}")
    return "{" + ",".join(parts) + "}"


def extraction_example(rng: random.Random) -> tuple[str, str]:
    """One (user message, assistant answer) pair: an instruction naming the keys, then a document."""
    kind = rng.choice(KINDS)
    locale = _LOCALES[rng.choice(tuple(_LOCALES))]
    language = LANGUAGE[locale.code]
    money_style = rng.choice(locale.money_styles)
    layout = rng.choice(LAYOUTS)
    present: list[tuple[_Field, str]] = []
    answer: dict[str, Any] = {}
    for field in kind.fields:
        if field.kind == "tax_id" and language == "en":
            answer[field.key] = None  # the US/UK world has no such ids
            continue
        if field.optional and rng.random() < 0.3:
            answer[field.key] = None
            continue
        if field.kind == "currency" and rng.random() < 0.5:
            answer[field.key] = locale.currency  # said by the amounts' symbol only
            continue
        printed, value = _value(rng, field, locale, money_style)
        answer[field.key] = value
        present.append((field, printed))
    keys = rng.sample([field.key for field in kind.fields], rng.randint(3, min(6, len(kind.fields))))
    amounts = {field.key for field in kind.fields if field.kind == "amount"}
    dates = {field.key for field in kind.fields if field.kind == "date"}
    named = [key + (_ISO_DATE_HINT if key in dates else "") for key in keys]
    listed = ", ".join(named[:-1]) + f" and {named[-1]}" if len(named) > 1 else named[0]
    instruction = f"Extract {listed} from the {kind.key}. Answer with JSON only."
    document = _render(rng, kind, language, layout, present)
    return f"{instruction}\n\n{document}", _render_answer(keys, answer, amounts)


def _render(rng: random.Random, kind: _Kind, language: str, layout: str, present: list[tuple[_Field, str]]) -> str:
    colon = " : " if language == "fr" else ": "
    rng.shuffle(present)
    title = kind.titles[language]
    if layout == "letterhead":
        head = [value for field, value in present if field.key == kind.issuer]
        rest = [(field, value) for field, value in present if field.key != kind.issuer]
        lines = [*head, "", title] + [f"{field.labels[language]}{colon}{value}" for field, value in rest]
        return "\n".join(lines)
    if layout == "sentence":
        bits = [f"{field.labels[language]} {value}" for field, value in present]
        joined = "; ".join(bits[:-1]) + f" {_AND[language]} {bits[-1]}" if len(bits) > 1 else "".join(bits)
        return f"{title}\n\n{rng.choice(_SENTENCES[language])} {joined}."
    if layout == "table":
        split = max(1, len(present) // 2)
        rows = []
        for chunk in (present[:split], present[split:]):
            if chunk:
                rows.append(" | ".join(field.labels[language] for field, _ in chunk))
                rows.append(" | ".join(value for _, value in chunk))
        return "\n".join([title, *rows])
    return "\n".join([title] + [f"{field.labels[language]}{colon}{value}" for field, value in present])


def curriculum(seed: int, n_examples: int) -> list[tuple[str, str]]:
    """``n_examples`` (user message, answer) pairs, a pure function of ``seed``."""
    return [extraction_example(random.Random(f"tuneloop-curriculum|{seed}|{index}")) for index in range(n_examples)]
