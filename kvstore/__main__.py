from kvstore.server_cli import main

raise SystemExit(main())
