"""Run by `torch.distributed.run` with 2 CPU processes (gloo): load a saved ResoLLM with `tp_plan="auto"` and write,
from rank 0, how its logits and greedy generation compare with the unsharded model (tests/test_native_contracts.py)."""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import reso_hf  # noqa: F401  (registers ResoLLM)


def main(folder: str, result_path: str) -> None:
    dist.init_process_group("gloo")
    sharded = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto").eval()
    whole = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.no_grad():
        difference = (sharded(ids).logits - whole(ids).logits).abs().max().item()
        kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        same_generation = torch.equal(sharded.generate(ids, **kwargs), whole.generate(ids, **kwargs))
    coupling = sharded.model.layers[0].self_attn.kuramoto.coupling
    if dist.get_rank() == 0:
        with open(result_path, "w", encoding="utf-8") as handle:
            json.dump({"max_logit_difference": difference, "same_generation": same_generation,
                       "local_coupling_heads": coupling.to_local().shape[0], "world_size": dist.get_world_size()},
                      handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
