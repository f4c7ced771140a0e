from services.common.service import main
from services.shipping.app import build_app
from services.shipping.settings import ShippingSettings

main(ShippingSettings(), build_app)
