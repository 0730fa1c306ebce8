from ablate.list import main

raise SystemExit(main())
