"""``python -m npsparseattn`` runs the command line."""

import sys

from npsparseattn.cli import main

sys.exit(main())
