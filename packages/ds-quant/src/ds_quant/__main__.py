import sys

from ds_quant.cli import main

sys.exit(main())
