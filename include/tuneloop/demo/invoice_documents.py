"""One invoice document: the invoice drawn for a domain (vendor, buyer, number, date, items, totals,
VAT id) and rendered in one of its layouts (letter, key/value block, line-item table, e-mail,
EN 16931 e-invoice export, payment reminder)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

from tuneloop.demo.invoice_locales import (
    _DATE_RANGE,
    _DOMAIN_LOCALES,
    _E_INVOICE_PROFILES,
    _ITEM_PRICES,
    _LOCALES,
    _MONTHS,
    _REMINDERS,
    LAYOUTS,
    _Locale,
)
from tuneloop.demo.invoice_task import DOMAINS, FIELDS

if TYPE_CHECKING:
    import random
    from collections.abc import Callable


@dataclass(frozen=True)


class _Invoice:
    """Everything one document may mention; the layouts choose what to print."""

    locale: _Locale
    vendor: str
    vendor_address: str
    vendor_city: str
    vat_id: str | None
    customer: str
    customer_address: str
    buyer_vat_id: str
    invoice_number: str
    issued: date
    due: date
    order_ref: str
    lines: tuple[tuple[str, int, int], ...]  # (description, quantity, unit cents)
    shipping: int
    tax_rate: str
    net: int
    tax: int
    total: int
    signer: str
    date_style: str
    money_style: tuple[str, str, bool]

    def money(self, cents: int) -> str:
        prefix, suffix, grouped = self.money_style
        return prefix + _number(cents, self.locale, grouped=grouped) + suffix

    def day(self, value: date) -> str:
        return _format_date(value, self.date_style)

    def gold(self) -> dict[str, Any]:
        fields = {
            "vendor": self.vendor,
            "invoice_number": self.invoice_number,
            "date": self.issued.isoformat(),
            "currency": self.locale.currency,
            "total": self.total / 100,
            "vat_id": self.vat_id,
        }
        return {name: fields[name] for name in FIELDS}


def _number(cents: int, locale: _Locale, *, grouped: bool = True) -> str:
    units, fraction = divmod(cents, 100)
    whole = f"{units:,}".replace(",", locale.thousands) if grouped else str(units)
    return f"{whole}{locale.decimal}{fraction:02d}"


def _format_date(value: date, style: str) -> str:
    month = _MONTHS[value.month - 1]
    return {
        "us_numeric": f"{value.month:02d}/{value.day:02d}/{value.year}",
        "us_long": f"{month} {value.day}, {value.year}",
        "uk_short": f"{value.day} {month[:3]} {value.year}",
        "uk_long": f"{value.day} {month} {value.year}",
        "dmy_dot": f"{value.day:02d}.{value.month:02d}.{value.year}",
        "dmy_slash": f"{value.day:02d}/{value.month:02d}/{value.year}",
        "dmy_dash": f"{value.day:02d}-{value.month:02d}-{value.year}",
        "iso": value.isoformat(),
    }[style]


def _company(rng: random.Random, locale: _Locale) -> str:
    name, trade = rng.choice(locale.names), rng.choice(locale.trades)
    words = (trade, name) if locale.trade_first else (name, trade)
    return f"{words[0]} {words[1]} {rng.choice(locale.legal_forms)}"


def _address(rng: random.Random, locale: _Locale) -> tuple[str, str]:
    """A street address in the locale's format, and its city."""
    street, (city, code) = rng.choice(locale.streets), rng.choice(locale.cities)
    number = rng.randint(1, 999) if locale.domain == "original" else rng.randint(1, 120)
    if locale.code == "us":
        return f"{number} {street}, {city} {code}{rng.randint(0, 99):02d}", city.split(",")[0]
    if locale.code == "uk":
        letters = "ABDEFGHJLNPQRSTUWXYZ"
        inward = f"{rng.randint(1, 9)}{rng.choice(letters)}{rng.choice(letters)}"
        return f"{number} {street}, {city} {code}{rng.randint(1, 20)} {inward}", city
    if locale.code == "nl":
        letters = "ABCDEGHJKLMNPRST"
        postcode = f"{code}{rng.randint(10, 99)} {rng.choice(letters)}{rng.choice(letters)}"
        return f"{street} {number}, {postcode} {city}", city
    postcode = code + "".join(str(rng.randint(0, 9)) for _ in range(5 - len(code)))
    if locale.code == "fr":
        return f"{number} {street}, {postcode} {city}", city
    return f"{street} {number}, {postcode} {city}", city


def _vat_id(rng: random.Random, locale: _Locale) -> str:
    def digits(count: int) -> str:
        return "".join(str(rng.randint(0, 9)) for _ in range(count))

    if locale.code == "de":
        return f"DE{rng.randint(1, 9)}{digits(8)}"
    if locale.code == "fr":
        return f"FR{digits(2)}{rng.randint(1, 9)}{digits(8)}"
    if locale.code == "nl":
        return f"NL{digits(9)}B{rng.randint(1, 19):02d}"
    if locale.code == "es":
        return f"ES{rng.choice('ABG')}{digits(8)}"
    raise ValueError(f"locale {locale.code!r} has no VAT ids")


def _invoice_number(rng: random.Random, locale: _Locale, vendor: str, year: int) -> str:
    serial = rng.randint(1, 9999)
    patterns = {
        "us": (
            f"INV-{rng.randint(10000, 99999)}",
            f"INV-{year}-{serial:04d}",
            f"{rng.randint(100000, 999999)}",
        ),
        "de": (f"RE-{year}-{serial:04d}", f"R{year}{serial:05d}", f"{year}-{serial:05d}"),
        "fr": (
            f"F{year}-{serial:05d}",
            f"FA-{rng.randint(10000, 999999):06d}",
            f"FAC{year}{serial:04d}",
        ),
        "nl": (
            f"{year}-{serial:04d}",
            f"F{year}.{serial:04d}",
            f"INV{rng.randint(1000, 999999):06d}",
        ),
        "es": (
            f"FAC-{year}/{serial:04d}",
            f"A-{rng.randint(100, 99999):05d}",
            f"{year}/{serial:04d}",
        ),
    }
    initials = "".join(word[0] for word in vendor.split() if word[0].isalpha())[:3].upper()
    patterns["uk"] = (f"{initials}-{rng.randint(1000, 99999)}", *patterns["us"][:2])
    return rng.choice(patterns[locale.code])


def _order_ref(rng: random.Random) -> str:
    return rng.choice(
        (
            f"PO-{rng.randint(1000, 99999)}",
            f"4500{rng.randint(10000, 99999)}",
            f"{rng.randint(10000, 99999)}",
        )
    )


def _random_date(rng: random.Random) -> date:
    first, last = _DATE_RANGE
    return first + timedelta(days=rng.randint(0, (last - first).days))


def _percent_of(cents: int, rate: str) -> int:
    return int((Decimal(cents) * Decimal(rate) / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _invoice(rng: random.Random, domain: str) -> _Invoice:
    locale = _LOCALES[rng.choice(_DOMAIN_LOCALES[domain])]
    vendor = _company(rng, locale)
    customer_locale = (
        locale if domain == "original" else _LOCALES[rng.choice(_DOMAIN_LOCALES[domain])]
    )
    customer = _company(rng, customer_locale)
    while customer == vendor:
        customer = _company(rng, customer_locale)
    issued = _random_date(rng)
    lines = []
    for index in rng.sample(range(len(_ITEM_PRICES)), rng.randint(1, 3)):
        low, high = _ITEM_PRICES[index]
        unit = rng.randint(low // 5, high // 5) * 5
        quantity = 1 if unit > 40000 else rng.randint(1, 8)
        lines.append((locale.items[index], quantity, unit))
    shipping = 0 if len(lines) == 3 else rng.choice((0, 0, 1500, 2500, 4900))
    net = sum(quantity * unit for _, quantity, unit in lines)
    tax_rate = rng.choice(locale.tax_rates)
    tax = _percent_of(net + shipping, tax_rate)
    first_names, last_names = locale.people
    vendor_address, vendor_city = _address(rng, locale)
    return _Invoice(
        locale=locale,
        vendor=vendor,
        vendor_address=vendor_address,
        vendor_city=vendor_city,
        vat_id=_vat_id(rng, locale) if domain == "drifted" else None,
        customer=customer,
        customer_address=_address(rng, customer_locale)[0],
        buyer_vat_id=_vat_id(rng, customer_locale) if domain == "drifted" else "",
        invoice_number=_invoice_number(rng, locale, vendor, issued.year),
        issued=issued,
        due=issued + timedelta(days=rng.choice((14, 30, 30, 45, 60))),
        order_ref=_order_ref(rng),
        lines=tuple(lines),
        shipping=shipping,
        tax_rate=tax_rate,
        net=net,
        tax=tax,
        total=net + shipping + tax,
        signer=f"{rng.choice(first_names)} {rng.choice(last_names)}",
        date_style=rng.choice(locale.date_styles),
        money_style=rng.choice(locale.money_styles),
    )


def _items_phrase(invoice: _Invoice) -> str:
    return " and ".join(f"{qty} x {item.lower()}" for item, qty, _ in invoice.lines)


def _letter(rng: random.Random, invoice: _Invoice) -> str:
    tax_word = "VAT" if invoice.locale.code == "uk" else "sales tax"
    bodies = (
        "Please accept this letter as our invoice for {items}, supplied under your purchase "
        "order {order}. The subtotal comes to {net}, plus {tax_word} of {tax}, for a total of "
        "{total}. Kindly remit by {due}.",
        "Thank you for your order {order}. We are pleased to invoice you for {items}. "
        "Net amount: {net}. {Tax_word}: {tax}. Total due: {total}, payable by {due}.",
    )
    body = rng.choice(bodies).format(
        items=_items_phrase(invoice),
        order=invoice.order_ref,
        net=invoice.money(invoice.net + invoice.shipping),
        tax_word=tax_word,
        Tax_word=tax_word[0].upper() + tax_word[1:],
        tax=invoice.money(invoice.tax),
        total=invoice.money(invoice.total),
        due=invoice.day(invoice.due),
    )
    reference = rng.choice(("Invoice {}", "Re: Invoice No. {}", "Our ref: invoice {}"))
    return "\n".join(
        (
            invoice.vendor,
            invoice.vendor_address,
            "",
            invoice.day(invoice.issued),
            "",
            invoice.customer,
            invoice.customer_address,
            "",
            reference.format(invoice.invoice_number),
            "",
            "Dear Accounts Payable,",
            "",
            body,
            "",
            rng.choice(("Sincerely,", "Yours faithfully,", "Kind regards,")),
            f"{invoice.signer}, Billing",
        )
    )


def _key_value(rng: random.Random, invoice: _Invoice) -> str:
    labels, colon = invoice.locale.labels, invoice.locale.labels.colon
    item, quantity, _ = invoice.lines[0]
    rows = [
        labels.title,
        f"{labels.vendor}{colon}{invoice.vendor}",
        invoice.vendor_address,
    ]
    if invoice.vat_id:
        rows.append(f"{labels.vat_id}{colon}{invoice.vat_id}")
    rows += [
        f"{rng.choice(labels.invoice_no)}{colon}{invoice.invoice_number}",
        f"{rng.choice(labels.date)}{colon}{invoice.day(invoice.issued)}",
    ]
    optional = [
        f"{labels.due}{colon}{invoice.day(invoice.due)}",
        f"{labels.order}{colon}{invoice.order_ref}",
    ]
    rows += [row for row in optional if rng.random() < 0.7]
    rows += [
        f"{labels.customer}{colon}{invoice.customer}, {invoice.customer_address}",
        f"{labels.subject}{colon}{item} ({quantity})",
        f"{labels.net}{colon}{invoice.money(invoice.net + invoice.shipping)}",
        f"{labels.tax.format(rate=invoice.tax_rate)}{colon}{invoice.money(invoice.tax)}",
        f"{rng.choice(labels.total)}{colon}{invoice.money(invoice.total)}",
    ]
    return "\n".join(rows)


def _line_items(rng: random.Random, invoice: _Invoice) -> str:
    locale, labels = invoice.locale, invoice.locale.labels
    colon = labels.colon
    header = f"{invoice.vendor} | {invoice.vendor_address}"
    rows = [header]
    if invoice.vat_id:
        rows.append(f"{labels.vat_id}{colon}{invoice.vat_id}")
    rows += [
        f"{labels.title} {invoice.invoice_number}",
        f"{rng.choice(labels.date)}{colon}{invoice.day(invoice.issued)} | "
        f"{labels.order}{colon}{invoice.order_ref}",
        f"{labels.customer}{colon}{invoice.customer}",
        "",
        " | ".join(labels.columns),
    ]
    for item, quantity, unit in invoice.lines:
        rows.append(
            f"{item} | {quantity} | {_number(unit, locale)} | {_number(quantity * unit, locale)}"
        )
    rows.append(f"{labels.net}{colon}{_number(invoice.net, locale)}")
    if invoice.shipping:
        rows.append(f"{labels.shipping}{colon}{_number(invoice.shipping, locale)}")
    rows.append(f"{labels.tax.format(rate=invoice.tax_rate)}{colon}{_number(invoice.tax, locale)}")
    rows.append(f"{labels.table_total}{colon}{invoice.money(invoice.total)}")
    return "\n".join(rows)


def _email(rng: random.Random, invoice: _Invoice) -> str:
    tax_word = "VAT" if invoice.locale.code == "uk" else "tax"
    greeting = rng.choice(("Hi", "Hello", "Dear"))
    recipient = rng.choice(invoice.locale.people[0])
    return "\n".join(
        (
            f"Subject: Invoice {invoice.invoice_number} from {invoice.vendor}",
            "",
            f"{greeting} {recipient},",
            "",
            f"Please find attached invoice {invoice.invoice_number} dated "
            f"{invoice.day(invoice.issued)} for {_items_phrase(invoice)}. The amount due is "
            f"{invoice.money(invoice.total)} (including {invoice.money(invoice.tax)} {tax_word}), "
            f"payable by {invoice.day(invoice.due)}. Please quote {invoice.order_ref} on your "
            "remittance.",
            "",
            rng.choice(("Thanks,", "Best regards,", "Many thanks,")),
            invoice.signer,
            invoice.vendor,
            invoice.vendor_address,
        )
    )


def _e_invoice(rng: random.Random, invoice: _Invoice) -> str:
    """A human-readable view of an EN 16931 e-invoice (XRechnung, Factur-X...)."""

    def amount(cents: int) -> str:
        return f"{cents // 100}.{cents % 100:02d}"

    seller = [f"Seller: {invoice.vendor}", f"Seller VAT ID: {invoice.vat_id}"]
    buyer = [f"Buyer: {invoice.customer}", f"Buyer VAT ID: {invoice.buyer_vat_id}"]
    parties = seller + buyer if rng.random() < 0.7 else buyer + seller
    return "\n".join(
        (
            f"E-INVOICE (EN 16931, {_E_INVOICE_PROFILES[invoice.locale.code]})",
            f"Invoice number: {invoice.invoice_number}",
            f"Issue date: {invoice.issued.isoformat()}",
            f"Due date: {invoice.due.isoformat()}",
            f"Currency: {invoice.locale.currency}",
            *parties,
            f"Order reference: {invoice.order_ref}",
            f"Total without VAT: {amount(invoice.net + invoice.shipping)}",
            f"VAT total: {amount(invoice.tax)}",
            f"Total with VAT: {amount(invoice.total)}",
            f"Amount due: {amount(invoice.total)}",
        )
    )


def _reminder(rng: random.Random, invoice: _Invoice) -> str:
    title, salutation, body, closing = _REMINDERS[invoice.locale.code]
    sent = invoice.due + timedelta(days=rng.randint(7, 30))
    pay_by = sent + timedelta(days=rng.choice((7, 10, 14)))
    return "\n".join(
        (
            f"{invoice.vendor} · {invoice.vendor_address}",
            f"{invoice.vendor_city}, {invoice.day(sent)}",
            "",
            invoice.customer,
            invoice.customer_address,
            "",
            title,
            "",
            salutation,
            "",
            body.format(
                invoice=invoice.invoice_number,
                issued=invoice.day(invoice.issued),
                total=invoice.money(invoice.total),
                pay_by=invoice.day(pay_by),
            ),
            "",
            closing,
            invoice.signer,
            f"{invoice.locale.labels.vat_id}{invoice.locale.labels.colon}{invoice.vat_id}",
        )
    )

_RENDERERS: dict[str, Callable[[random.Random, _Invoice], str]] = {
    "letter": _letter,
    "key_value": _key_value,
    "line_items": _line_items,
    "email": _email,
    "e_invoice": _e_invoice,
    "reminder": _reminder,
}


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")


def make_document(
    rng: random.Random, domain: str, *, layout: str | None = None
) -> tuple[str, dict[str, Any]]:
    """One invoice of ``domain`` and its gold fields (keys in FIELDS order).

    ``layout`` picks one of ``LAYOUTS[domain]``; by default it is drawn from ``rng``.
    """
    _check_domain(domain)
    if layout is None:
        layout = rng.choice(LAYOUTS[domain])
    elif layout not in LAYOUTS[domain]:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS[domain]} for {domain!r}")
    invoice = _invoice(rng, domain)
    return _RENDERERS[layout](rng, invoice), invoice.gold()
