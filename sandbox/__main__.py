"""`python -m weightsync.sandbox up | down | status`."""

import sys

from weightsync.sandbox.cli import main

sys.exit(main())
