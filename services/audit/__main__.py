from services.audit.app import build_app
from services.audit.settings import AuditSettings
from services.common.service import main

main(AuditSettings(), build_app)
