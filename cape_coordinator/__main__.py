"""``python -m cape_coordinator ...``: the coordinator's subcommands without the ``cape`` CLI."""

import sys

from .cli import main

sys.exit(main())
