"""``python -m slimtorch.serve``: the same as ``slimtorch serve``."""

from __future__ import annotations

import argparse
import sys

from slimtorch.cli import serve_cmd


def main(argv: list[str] | None = None) -> int:
    """Parse the ``slimtorch serve`` options and run the server."""
    parser = argparse.ArgumentParser(prog="python -m slimtorch.serve")
    sub = parser.add_subparsers(dest="command")
    serve_cmd.add_parser(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
