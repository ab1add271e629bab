from instaprune.cli.main import main

raise SystemExit(main())
