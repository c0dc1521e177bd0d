import sys

from ds_models.cli import main

sys.exit(main())
