import sys

from lqf.cli import main

sys.exit(main())
