"""``python -m slimtorch.cli``: the same as the ``slimtorch`` command (used under torchrun)."""

import sys

from slimtorch.cli.main import main

sys.exit(main())
