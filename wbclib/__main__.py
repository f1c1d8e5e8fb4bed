"""``python -m wbclib``: the ``wbc`` command line, for when the script is not on PATH."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
