import sys

from miglet.cli import main

sys.exit(main())
