"""python -m coordinator: the fedmeki-coordinator command."""

import sys

from coordinator.cli import main

sys.exit(main())
