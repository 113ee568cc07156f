import sys

from pc.cli import main

sys.exit(main())
