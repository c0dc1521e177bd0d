import sys

from ds_bench.cli import main

sys.exit(main())
