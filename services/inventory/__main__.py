from services.common.service import main
from services.inventory.app import build_app
from services.inventory.settings import InventorySettings

main(InventorySettings(), build_app)
