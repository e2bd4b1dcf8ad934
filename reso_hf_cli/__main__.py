"""`python -m reso_hf_cli`: the `reso-hf` command."""

import sys

from . import main

sys.exit(main())
