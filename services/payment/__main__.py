from services.common.service import main
from services.payment.app import build_app
from services.payment.settings import PaymentSettings

main(PaymentSettings(), build_app)
