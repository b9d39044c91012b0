"""`python -m opta_lmx.cli`: the same as `lmx`."""

import sys

from opta_lmx.cli import main

sys.exit(main())
