"""`python -m ctrltok` (also what `accelerate launch -m ctrltok train ...` runs)."""

import sys

from ctrltok.cli.main import main

sys.exit(main())
