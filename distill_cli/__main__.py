from distill_cli.main import main

raise SystemExit(main())
