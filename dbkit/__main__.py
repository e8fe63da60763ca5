"""``python -m dbkit`` runs the command line."""

import sys

from dbkit.cli import main

sys.exit(main())
