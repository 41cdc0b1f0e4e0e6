"""python -m silo_agent: the fedmeki-silo command."""

import sys

from silo_agent.cli import main

sys.exit(main())
