"""Run by `accelerate launch --config_file recipes/accelerate/fsdp.yaml` with 2 CPU processes (gloo): several
`reso-hf train` / `reso-hf sft` runs in the same processes, so that the test pays the start-up once
(tests/test_training_runs.py).

argv[1]: JSON list of [kind, flags] or [kind, flags, interrupted_copy_of]: kind "pretrain" or "sft"; with a third
item, the run's --output_dir is first made a copy of that finished run's folder as it was before its last
checkpoint (as if killed there), and the flags resume it.
"""

import faulthandler
import json
import os
import shutil
import sys

import torch.distributed as dist
from accelerate.state import AcceleratorState

from reso_hf.training import pretrain, sft
from reso_hf.training.commands import split_recipe_argument


def copy_before_last_checkpoint(source: str, target: str) -> None:
    checkpoints = sorted((d for d in os.listdir(source) if d.startswith("checkpoint-")), key=lambda d: int(d[11:]))
    finished = {checkpoints[-1], "model", "adapter", "run_summary.json", "loss_curves.png", "dynamic_lora_dynamics.png"}
    shutil.copytree(source, target, ignore=lambda folder, names: finished & set(names) if folder == source else [])


def main(runs: list) -> None:
    for kind, flags, *interrupted in runs:
        if interrupted:
            if dist.get_rank() == 0:
                copy_before_last_checkpoint(interrupted[0], flags[flags.index("--output_dir") + 1])
            dist.barrier()
        (pretrain if kind == "pretrain" else sft).main(*split_recipe_argument(flags))
        # the next run's Accelerator builds its own FSDP plugin (whose wrap policy is bound to the model's layers)
        AcceleratorState._reset_state(reset_partial_state=True)


if __name__ == "__main__":
    faulthandler.enable()  # a native abort in one rank then shows every thread's Python stack
    main(json.loads(sys.argv[1]))
