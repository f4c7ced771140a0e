"""Shipping's settings: which destinations are served and by which carrier."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from schemas.primitives import ISO_COUNTRIES
from services.common.settings import ChoreoSettings

EU_MEMBERS: frozenset[str] = frozenset(
    {
        "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU",
        "IE", "IT", "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
    }
)  # fmt: skip
DEFAULT_SHIPPING_COUNTRIES: frozenset[str] = EU_MEMBERS | {"GB", "NO", "CH", "US", "CA", "AU", "NZ", "JP"}
"""The 27 EU member states plus GB, NO, CH, US, CA, AU, NZ and JP (deliberately not AQ, Antarctica)."""


class ShippingSettings(ChoreoSettings):
    shipping_countries: Annotated[frozenset[str], NoDecode] = Field(
        default=DEFAULT_SHIPPING_COUNTRIES,
        description=(
            "Destinations served, as ISO 3166-1 alpha-2 codes; env CHOREO_SHIPPING_COUNTRIES as a comma-separated "
            'list ("FR,DE,US") or a JSON list. Default: the EU-27 plus GB, NO, CH, US, CA, AU, NZ, JP.'
        ),
    )
    shipping_carrier: str = Field(default="choreo-post", min_length=1, description="Carrier named on every shipment.")
    health_port: int = Field(
        default=8103, ge=0, le=65535, description="Port of the /health endpoint; 0 picks a free one."
    )

    @field_validator("shipping_countries", mode="before")
    @classmethod
    def _parse_countries(cls, raw: Any) -> Any:
        if isinstance(raw, str):
            text = raw.strip()
            raw = json.loads(text) if text.startswith("[") else [part for part in text.split(",") if part.strip()]
        if isinstance(raw, (list, tuple, set, frozenset)):
            return frozenset(str(code).strip().upper() for code in raw)
        return raw

    @field_validator("shipping_countries")
    @classmethod
    def _known_countries(cls, codes: frozenset[str]) -> frozenset[str]:
        if not codes:
            # An empty list is almost always an unset variable, and would fail every order.
            raise ValueError("name at least one destination country")
        unknown = sorted(codes - ISO_COUNTRIES)
        if unknown:
            raise ValueError(f"not ISO 3166-1 alpha-2 country codes: {', '.join(unknown)}")
        return codes
