import sys

from rldiag.cli import main

sys.exit(main())
