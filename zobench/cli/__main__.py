"""``python -m zobench.cli``: the ``zobench`` command."""

import sys

from zobench.cli import main

if __name__ == "__main__":
    sys.exit(main())
