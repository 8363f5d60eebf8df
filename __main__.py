from fusewright.tools.cli import main

raise SystemExit(main())
