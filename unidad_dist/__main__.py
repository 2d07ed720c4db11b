from unidad_dist.cli import main

raise SystemExit(main())
