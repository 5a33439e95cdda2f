"""`python -m fastmoe train ...`, the same as the `fastmoe` console script."""

import sys

from fastmoe.cli import main

sys.exit(main())
