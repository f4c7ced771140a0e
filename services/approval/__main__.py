from services.approval.server import main

main()
