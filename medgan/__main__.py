"""``python -m medgan``: dispatches to :mod:`medgan.cli.main` (the installed command is ``medgan``)."""

import sys

from medgan.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
