"""``python -m bench``: what `scripts/bench` runs (see `bench.cli`)."""

import sys

from bench.cli import main

sys.exit(main())
