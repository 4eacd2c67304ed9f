"""Run ``slimtorch train`` with the arguments given, as one rank of a ``torchrun`` group."""

from __future__ import annotations

import os
import sys

from slimtorch.cli.main import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter finalisation: gloo threads torn down there can abort at random (a known
    # PyTorch shutdown race, not a training error); everything is written by now
    os._exit(code)
