"""`python -m reso_hf.train --recipe RECIPE.yaml [--field value ...]` (also under `accelerate launch -m`).

The same as `reso-hf train` (see `reso_hf.training.pretrain`); every recipe field is also a flag.
"""

import sys

from reso_hf_cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
