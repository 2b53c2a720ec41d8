"""The standalone build's entry point: `miglet`, as the console script is."""

import sys

from miglet.cli import main

if __name__ == "__main__":
    sys.exit(main())
