from ds_serve.cli import main

raise SystemExit(main())
