"""`python -m hgdeploy.cli`: the same as the `hgdeploy` console script."""

import sys

from hgdeploy.cli.main import main

sys.exit(main())
