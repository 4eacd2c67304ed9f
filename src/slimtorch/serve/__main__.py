"""``python -m slimtorch.serve``: the same as ``slimtorch serve``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the ``slimtorch serve`` options and run the server, with the command line's
    handling of errors (a bad option value is one line and exit status 2, not a traceback)."""
    from slimtorch.cli.main import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
