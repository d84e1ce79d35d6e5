"""`python -m convbn_fx report SPEC`: the same CLI as the `convbn-fx` console script."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m convbn_fx"))
