import sys

from cps4_engine.cli import main

sys.exit(main())
