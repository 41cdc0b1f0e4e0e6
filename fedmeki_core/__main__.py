"""`python -m fedmeki_core`: the `fedmeki` command, which lives in fedmeki_core.app (the one import of the app here)."""

import sys

from fedmeki_core.app.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
