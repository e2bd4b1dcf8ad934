"""`python -m reso_hf.cli` (and `torchrun -m reso_hf.cli`): the `reso-hf` command.

The command itself is `reso_hf_cli.main`, kept outside this package so that `reso-hf --help` does not import
torch; this module is the same command for launchers that take a module inside reso_hf.
"""

import sys

from reso_hf_cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
