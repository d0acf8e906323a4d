"""`python -m hgdeploy.cli`: the same as the `hgdeploy` console script."""

import sys

from hgdeploy.cli.main import main

if __name__ == "__main__":  # not again in the processes a command starts (multiprocessing's spawn)
    sys.exit(main())
