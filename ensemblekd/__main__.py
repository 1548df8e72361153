import sys

from ensemblekd.cli import main

sys.exit(main())
