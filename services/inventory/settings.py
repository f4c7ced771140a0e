"""Inventory's settings: the shared ones plus where the starting stock comes from."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.common.settings import ChoreoSettings

DEFAULT_CATALOG = Path(__file__).resolve().parent / "catalog.json"


class InventorySettings(ChoreoSettings):
    """Read from `CHOREO_*` environment variables, e.g. `CHOREO_INVENTORY_CATALOG`."""

    inventory_catalog: Path = Field(
        default=DEFAULT_CATALOG,
        description='JSON object {"<sku>": <starting stock>}; a SKU not listed has no stock.',
    )
    health_port: int = Field(
        default=8101, ge=0, le=65535, description="Port of the /health endpoint; 0 picks a free one."
    )
