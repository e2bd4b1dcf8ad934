"""Run by `accelerate launch --config_file recipes/accelerate/fsdp.yaml` with 2 CPU processes (gloo): `reso-hf train`
and then `reso-hf sft` in the same processes, so that the test pays the start-up once (tests/test_training_runs.py).

argv[1]: JSON list of [kind, flags] with kind "pretrain" or "sft".
"""

import json
import sys

from accelerate.state import AcceleratorState

from reso_hf.training import pretrain, sft
from reso_hf.training.commands import split_recipe_argument


def main(runs: list) -> None:
    for kind, flags in runs:
        (pretrain if kind == "pretrain" else sft).main(*split_recipe_argument(flags))
        # the next run's Accelerator builds its own FSDP plugin (whose wrap policy is bound to the model's layers)
        AcceleratorState._reset_state(reset_partial_state=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
