import sys

from bct.experiments.cli import main

sys.exit(main())
