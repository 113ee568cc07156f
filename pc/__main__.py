import sys

from pc.experiments.cli import main

sys.exit(main())
