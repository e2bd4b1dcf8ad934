"""Size on disk of a saved DynamicLoRA adapter and of its dynamics state, on a model of SmolLM2-135M's shapes.

The sizes depend on the shapes only, so the base is a randomly initialised `LlamaForCausalLM` with
SmolLM2-135M's configuration (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocabulary
49,152); nothing is downloaded. Two adapters with the default tiers (32/16/8/4/2 since issue 20; 64/32/16/8/4 before):

- `default`: `DynamicLoraConfig()` as it comes (PEFT's LoRA targets for Llama: q_proj, v_proj);
- `sft_all_linear`: what `reso-hf sft` uses (`target_modules="all-linear"`, the 910 MB checkpoint of issue 19).

Each adapter trains for a few AdamW steps with `dynamic_step` on random tokens (so importance and phases are
populated), runs one manual migration (one rollback point in the ring), and is saved with `save_pretrained`.
The table lists the files of the folder; the JSON also records how long writing and restoring the dynamics
state took (best of 3, one thread, so that other processes on the machine disturb it less).

    python benchmarks/dynamic_lora_state_size.py                 # table + results/dynamic_lora_state_size.json
    python benchmarks/dynamic_lora_state_size.py --steps 1 --output /tmp/sizes.json
    # the previous state format: the package of an older commit first on the path
    mkdir /tmp/format1 && git archive b8d5f0c reso_hf | tar -x -C /tmp/format1 && PYTHONPATH=/tmp/format1 \
        python benchmarks/dynamic_lora_state_size.py --note "reso_hf of b8d5f0c" --output /tmp/format1.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
import reso_hf  # noqa: E402
from dynamic_lora_common import RESULTS, markdown_table, timed  # noqa: E402

SMOLLM2_135M_SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                           tie_word_embeddings=True)
ADAPTERS = {
    "default": {},
    "sft_all_linear": {"target_modules": "all-linear"},
}
FILES = ("adapter_model.safetensors", "dynamic_lora_state.safetensors", "dynamic_lora_state.json",
         "dynamic_lora_audit.jsonl", "adapter_config.json")
MB = 1e6


def measure(name: str, settings: dict, steps: int, seq: int) -> dict:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_SHAPES))
    model = get_peft_model(base, reso_hf.DynamicLoraConfig(task_type="CAUSAL_LM", **settings))
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, SMOLLM2_135M_SHAPES["vocab_size"], (1, seq), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        tuner.dynamic_step(optimizer)
        optimizer.zero_grad()
    tuner.migrate(next(iter(tuner.adapter_layers())), "context")
    adapter_parameters = sum(p.numel() for n, p in model.named_parameters() if "dynamic_lora_" in n)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        sizes = {f: Path(directory, f).stat().st_size for f in FILES if Path(directory, f).exists()}
        version = json.loads(Path(directory, "dynamic_lora_state.json").read_text()).get("version")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        save_seconds, load_seconds = [], []
        for _ in range(3):
            save_seconds.append(timed(lambda: tuner.save_dynamics_state(directory)))
            load_seconds.append(timed(lambda: tuner.load_dynamics_state(directory)))
        torch.set_num_threads(threads)
    state = sizes["dynamic_lora_state.safetensors"] + sizes["dynamic_lora_state.json"]
    return {
        "adapter": name,
        "settings": settings,
        "adapted_modules": len(tuner.adapter_layers()),
        "adapter_parameters": adapter_parameters,
        "state_format_version": version,
        "bytes": sizes,
        "state_bytes": state,
        "state_over_weights": state / sizes["adapter_model.safetensors"],
        "folder_bytes": sum(sizes.values()),
        "save_state_seconds": min(save_seconds),
        "load_state_seconds": min(load_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps before saving")
    parser.add_argument("--seq", type=int, default=32, help="tokens per training step")
    parser.add_argument("--output", default=str(RESULTS / "dynamic_lora_state_size.json"))
    parser.add_argument("--note", default="", help="free text kept in the JSON (e.g. which reso_hf was measured)")
    args = parser.parse_args()
    rows = [measure(name, settings, args.steps, args.seq) for name, settings in ADAPTERS.items()]
    table = markdown_table(
        ["adapter", "modules", "adapter params", "weights MB", "state .safetensors MB", "state .json MB",
         "audit MB", "state / weights", "folder MB", "state format"],
        [[r["adapter"], r["adapted_modules"], r["adapter_parameters"],
          r["bytes"]["adapter_model.safetensors"] / MB, r["bytes"]["dynamic_lora_state.safetensors"] / MB,
          r["bytes"]["dynamic_lora_state.json"] / MB, r["bytes"].get("dynamic_lora_audit.jsonl", 0) / MB,
          r["state_over_weights"], r["folder_bytes"] / MB, r["state_format_version"]] for r in rows],
    )
    print(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {"command": "python benchmarks/dynamic_lora_state_size.py " + " ".join(sys.argv[1:]),
              "commit": commit or None, "note": args.note, "reso_hf": str(Path(reso_hf.__file__).parent),
              "base": "random LlamaForCausalLM, SmolLM2-135M shapes",
              "shapes": SMOLLM2_135M_SHAPES, "steps": args.steps, "seq": args.seq,
              "torch": torch.__version__, "python": platform.python_version(), "rows": rows,
              "table_markdown": table}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
