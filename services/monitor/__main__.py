from services.monitor.runner import main
from services.monitor.settings import MonitorSettings

main(MonitorSettings())
