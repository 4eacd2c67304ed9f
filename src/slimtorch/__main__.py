"""``python -m slimtorch``: the same as the ``slimtorch`` command."""

import sys

from slimtorch.cli.main import main

sys.exit(main())
