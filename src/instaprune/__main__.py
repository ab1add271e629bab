from instaprune.cli import main

raise SystemExit(main())
