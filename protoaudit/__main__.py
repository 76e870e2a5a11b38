from protoaudit.cli import main

main()
