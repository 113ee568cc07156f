import sys

from bct.cli import main

sys.exit(main())
