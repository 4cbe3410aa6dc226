"""`python -m builder.flash`: flash-image without its console script (the tests, ci/)."""

import sys

from builder.flash.cli import main

sys.exit(main())
