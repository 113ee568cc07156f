import sys

from lqf.experiments.cli import main

sys.exit(main())
