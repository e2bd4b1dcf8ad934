"""Worker for test_distributed.py, launched by `torchrun --standalone --nproc_per_node 2` (gloo, CPU).

Every rank is one agent. Phases: an initial sync (no update), an aligned step (same batch and optimizer on
both ranks), an opposed step (rank 1 ascends the loss at half the rate). After each phase the rank writes its
tier values and resonance report under the output folder.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dynamic_lora_helpers import batch, small_config, tiny_llama  # noqa: E402


def flat(tuner, tier):
    return torch.cat([t.detach().reshape(-1) for k, t in sorted(tuner.tier_tensors().items())
                      if k.rsplit(".", 2)[-2] == tier])


def main(out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base = tiny_llama(seed=0)  # identical base on both ranks
    torch.manual_seed(100 + rank)  # different A factors per agent (B = 0: every agent starts as the base model)
    config = small_config(tiers=["domain", "swarm", "agent", "context"], init_weights=True,
                          horizontal_resonance=True, vertical_resonance=False, migration_enabled=False,
                          density_coupling=0.0, free_decay=0.0, screened_decay=0.0,
                          tier_inertia={"domain": 0.0, "swarm": 0.0, "agent": 0.0, "context": 0.0})
    model = get_peft_model(base, config)
    tuner = model.base_model
    report = {"rank": rank, "phases": {}}
    tensors = {}

    def record(phase, metrics, plain_norm=None, realised_norm=None):
        report["phases"][phase] = {"horizontal": metrics.get("horizontal"), "plain_update_norm": plain_norm,
                                   "realised_update_norm": realised_norm}
        for tier in config.tiers:
            tensors[f"{phase}.{tier}"] = flat(tuner, tier).contiguous()

    record("sync", tuner.dynamic_step(allow_missing_gradients=True))
    params = [p for p in model.parameters() if p.requires_grad]
    for phase in ("aligned", "opposed"):
        ascend = phase == "opposed" and rank == 1
        optimizer = torch.optim.SGD(params, lr=0.05 if not ascend else 0.025, maximize=ascend)
        before = flat(tuner, "swarm").clone()
        ids = batch(seed=42)  # the same data on both ranks
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        own_update = flat(tuner, "swarm") - before
        plain = own_update.clone()
        dist.all_reduce(plain)
        plain /= dist.get_world_size()
        metrics = tuner.dynamic_step(optimizer)
        optimizer.zero_grad()
        realised = flat(tuner, "swarm") - before
        record(phase, metrics, float(plain.norm()), float(realised.norm()))
    save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
