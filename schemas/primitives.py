"""Value types shared by every event: identifiers, money, ISO codes."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import pycountry
from pydantic import AfterValidator, Field, PlainSerializer, PlainValidator, StringConstraints, WithJsonSchema

_IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"
_DECIMAL_PATTERN = r"^(0|[1-9][0-9]{0,14})(\.[0-9]{1,4})?$"

ISO_COUNTRIES: frozenset[str] = frozenset(c.alpha_2 for c in pycountry.countries)
ISO_CURRENCIES: frozenset[str] = frozenset(c.alpha_3 for c in pycountry.currencies)

OrderId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=_IDENTIFIER_PATTERN),
    Field(description="Order identifier chosen by the client; also the Kafka record key."),
]
CustomerId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=_IDENTIFIER_PATTERN)]
Sku = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=_IDENTIFIER_PATTERN)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=500)]
Quantity = Annotated[int, Field(strict=True, ge=1, le=1_000_000)]


_DECIMAL = re.compile(_DECIMAL_PATTERN)


def _decimal_amount(value: Any) -> Decimal:
    # A JSON number would silently lose precision in many clients, so the wire form is a string only.
    # One validator for both checks: each Python validator is a call out of pydantic-core, per amount.
    if isinstance(value, str):
        if _DECIMAL.fullmatch(value) is None:
            raise ValueError(f'"{value}" is not a non-negative decimal with at most 4 fractional digits')
        return Decimal(value)  # the pattern admits only finite, non-negative amounts
    if not isinstance(value, Decimal):
        raise ValueError('must be a decimal string such as "12.50", not a JSON number')
    try:
        if not value.is_finite() or value < 0:
            raise ValueError("must be a finite, non-negative amount")
    except InvalidOperation as error:
        raise ValueError("must be a finite, non-negative amount") from error
    return value


Money = Annotated[
    Decimal,
    PlainValidator(_decimal_amount, json_schema_input_type=str),
    PlainSerializer(lambda amount: format(amount, "f"), return_type=str, when_used="always"),
    WithJsonSchema({"type": "string", "pattern": _DECIMAL_PATTERN, "examples": ["19.99"]}),
]


def _country(value: str) -> str:
    if value not in ISO_COUNTRIES:
        raise ValueError(f'"{value}" is not an ISO 3166-1 alpha-2 country code')
    return value


def _currency(value: str) -> str:
    if value not in ISO_CURRENCIES:
        raise ValueError(f'"{value}" is not an ISO 4217 currency code')
    return value


CountryCode = Annotated[
    str,
    AfterValidator(_country),
    WithJsonSchema({"type": "string", "enum": sorted(ISO_COUNTRIES), "description": "ISO 3166-1 alpha-2"}),
]
CurrencyCode = Annotated[
    str,
    AfterValidator(_currency),
    WithJsonSchema({"type": "string", "enum": sorted(ISO_CURRENCIES), "description": "ISO 4217"}),
]
