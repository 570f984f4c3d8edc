from bpfkeep.cli import main

raise SystemExit(main())
