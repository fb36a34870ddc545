"""`python -m edge_agent` runs the command line.

Imports only ``cli``.
"""

import sys

from .cli import main

sys.exit(main())
