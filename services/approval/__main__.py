from services.approval.app import build_app
from services.approval.settings import ApprovalSettings
from services.common.service import main

settings = ApprovalSettings()
main(settings, lambda _: build_app(settings))
