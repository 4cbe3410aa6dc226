"""`python -m builder.firstboot` on the host, and the bundle's entry point on the card (the
card's firstboot.pyz carries a copy of this file as its own __main__.py)."""

import sys

from builder.firstboot.cli import main

sys.exit(main())
