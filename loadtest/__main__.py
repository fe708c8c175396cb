"""`python -m quiver.loadtest ...`: the load generator's entry point (see quiver.loadtest.cli).

Contract: exits with `main(sys.argv[1:])`; `main(argv) -> int` is re-exported here for callers
such as `quiver bench`.
"""

from __future__ import annotations

import sys

from quiver.loadtest.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
