"""``python -m hpcai ...`` is the same as ``hpcai ...``."""

import sys

from hpcai.cli import main

sys.exit(main())
