"""`python -m reso_hf.train --recipe RECIPE.yaml [--field value ...]` (also under `accelerate launch -m`).

Pretrains a ResoLLM (see `reso_hf.training.pretrain`); every recipe field is also a flag.
"""

import sys

from .training.commands import split_recipe_argument
from .training.pretrain import main

if __name__ == "__main__":
    recipe, rest = split_recipe_argument(sys.argv[1:])
    sys.exit(main(recipe, rest))
