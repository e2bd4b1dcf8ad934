"""Multi-process training against one process: per-step losses, eval losses and saved weights.

Runs `reso-hf train` (a micro ResoLLM from scratch) and `reso-hf sft` (DynamicLoRA on a micro Llama) for a
few steps, once in one process and once per strategy in several processes with the same global batch
(same samples in the same order), through the accelerate recipes in `recipes/accelerate/`:

    ddp        multi_gpu_ddp.yaml
    fsdp       fsdp.yaml (FSDP2)
    deepspeed  deepspeed_zero2.yaml (only where `import deepspeed` works)

and prints the largest differences to the one-process run (and, for FSDP and DeepSpeed, to DDP with the same
number of processes): training loss per step, eval loss, the saved
model (`model/model.safetensors`) or adapter (`adapter/adapter_model.safetensors`), the DynamicLoRA
dynamics state (`adapter/dynamic_lora_state.*`), and whether the saved folder holds the same files.
Everything runs in float32 (`--mixed_precision no`), so the differences are those of the reduction order.

Devices: CUDA when there are at least `--nproc` GPUs; with one GPU the multi-process runs use CPU
processes (gloo; NCCL cannot put two ranks on one GPU) and FSDP also runs as one process on the GPU.
Without CUDA everything runs on CPU processes. The same command works on a laptop and on a GPU machine:

    python benchmarks/distributed_check.py                       # all kinds and strategies, ~2-3 min on 2 CPU cores
    python benchmarks/distributed_check.py --kinds sft --strategies fsdp --steps 3
    python benchmarks/distributed_check.py --device cpu --json benchmarks/results/distributed_check_cpu.json
    python benchmarks/distributed_check.py --kinds sft --strategies ddp fsdp --default-density-coupling \
        --json benchmarks/results/distributed_check_default_coupling.json   # 2 processes != 1 here, FSDP == DDP

Exit status 1 when a run fails or a difference exceeds its tolerance (see TOLERANCES; expected with
--default-density-coupling, whose point is the size of the difference).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SAMPLE_RECIPE = ROOT / "recipes" / "reso_llm" / "pretrain_sample.yaml"
ACCELERATE_RECIPES = {"ddp": "multi_gpu_ddp.yaml", "fsdp": "fsdp.yaml", "deepspeed": "deepspeed_zero2.yaml"}
MICRO_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
MICRO_RESO = dict(MICRO_MODEL, prime_code_dim=8, max_position_embeddings=128)
# density_coupling 0: the interaction density of the shared and swarm tiers counts the ranks (agents) by
# design, and with the default coupling it raises their inertia, so N processes and one process train
# differently (DynamicLoRA B factors 24% apart after 4 steps with 2 processes, DDP as well as FSDP). Without the
# coupling, every process count computes the same dynamics; the density numbers themselves still differ.
DYNAMIC_LORA = {"target_modules": ["q_proj", "v_proj"], "autocorr_window": 2, "density_coupling": 0.0,
                "tier_ranks": {"foundation": 4, "domain": 4, "swarm": 2, "agent": 2, "context": 2}}
RANK_DEPENDENT_DYNAMICS = ("density",)  # JSON keys of the dynamics state that count the ranks
SFT_LEARNING_RATE = "2e-3"  # large enough for the adapter to move visibly in a few steps
GLOBAL_BATCH = 4
# Largest acceptable differences to the one-process run (float32, so reduction order only): absolute for the
# losses and the dynamics' JSON numbers, relative to the tensor's largest magnitude for weights and dynamics
# tensors (the adapter's B factors start at 0 and stay small).
TOLERANCES = {"train_loss": 1e-4, "eval_loss": 1e-4, "weights": 1e-4, "dynamics": 1e-3, "dynamics_numbers": 1e-4}


def environment() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def deepspeed_status() -> str | None:
    """None when DeepSpeed imports, else why not (the run is then skipped with that reason)."""
    result = subprocess.run([sys.executable, "-c", "import deepspeed"], env=environment(), capture_output=True,
                            text=True)
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"import deepspeed exited with {result.returncode}"


def device_plans(device: str, nproc: int) -> list[tuple[str, int]]:
    """[(device, processes)] for the multi-process runs."""
    import torch

    gpus = torch.cuda.device_count()
    if device == "cuda" and gpus == 0:
        raise SystemExit("--device cuda: no CUDA device is visible")
    if device == "cpu" or gpus == 0:
        return [("cpu", nproc)]
    if gpus >= nproc:
        return [("cuda", nproc)]
    if device == "cuda":
        return [("cuda", gpus)]
    return [("cpu", nproc), ("cuda", 1)]  # one GPU: real sharding on CPU processes, FSDP's GPU path with one rank


def make_sft_base(directory: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import reso_hf

    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(0)
    tokenizer = reso_hf.create_default_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                         **MICRO_MODEL))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


MODULES = {"pretrain": ["-m", "reso_hf.train"], "sft": ["-m", "reso_hf.cli", "sft"]}


def training_arguments(kind: str, steps: int, per_device_batch: int, device: str, output_dir: Path,
                       base: Path | None = None) -> list[str]:
    """The flags of `reso-hf train` (kind "pretrain") or `reso-hf sft` (kind "sft", on `base`) for one run."""
    common = ["--output_dir", str(output_dir), "--block_size", "64", "--per_device_train_batch_size",
              str(per_device_batch), "--gradient_accumulation_steps", "1", "--max_steps", str(steps),
              "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", str(max(1, steps // 2)),
              # the same global eval batch: with several processes Trainer's eval loss of a step is the token mean
              # over all ranks' examples, as one process's loss over the whole batch
              "--per_device_eval_batch_size", str(per_device_batch), "--save_steps", str(steps),
              "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true" if device == "cpu" else "false",
              "--seed", "0"]
    if kind == "pretrain":
        return ["--recipe", str(SAMPLE_RECIPE), "--config_overrides", json.dumps(MICRO_RESO),
                "--max_eval_samples", "8", *common]
    return ["--base_model", str(base), "--use_bundled_sample", "true", "--dynamic_lora", json.dumps(DYNAMIC_LORA),
            "--max_train_samples", "40", "--max_eval_samples", "8", "--learning_rate", SFT_LEARNING_RATE, *common]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(strategy: str, nproc: int, device: str) -> list[str]:
    if strategy == "single":
        return [sys.executable]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / ACCELERATE_RECIPES[strategy]), "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port())]
    if device == "cuda":
        command += ["--gpu_ids", ",".join(str(i) for i in range(nproc))]
    return command


def run_name(kind: str, strategy: str, device: str, nproc: int) -> str:
    return f"{kind}-{strategy}-{device}{nproc}"


def run_training(kind: str, strategy: str, device: str, nproc: int, steps: int, work: Path, base: Path,
                 timeout: int) -> dict:
    name = run_name(kind, strategy, device, nproc)
    output_dir = work / name
    shutil.rmtree(output_dir, ignore_errors=True)
    per_device = GLOBAL_BATCH // nproc
    command = (launch_command(strategy, nproc, device) + MODULES[kind]
               + training_arguments(kind, steps, per_device, device, output_dir, base))
    started = time.time()
    env = environment()
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes even where a GPU exists
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    record = {"name": name, "kind": kind, "strategy": strategy, "device": device, "processes": nproc,
              "seconds": round(time.time() - started, 1), "returncode": result.returncode,
              "command": " ".join(command), "output_dir": str(output_dir)}
    if result.returncode != 0:
        record["error"] = result.stderr[-4000:]
    return record


def logged_losses(output_dir: Path, steps: int) -> tuple[dict, dict]:
    """({step: training loss}, {step: eval loss}) from the last checkpoint's trainer_state.json."""
    state = json.loads((output_dir / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    train = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    evaluation = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    return train, evaluation


def max_difference(reference: dict, other: dict) -> float:
    if set(reference) != set(other):
        return math.inf
    return max((abs(reference[key] - other[key]) for key in reference), default=0.0)


def tensor_difference(reference_file: Path, other_file: Path) -> tuple[float, str | None]:
    """(largest difference over all tensors relative to the tensor's largest magnitude, where it is)."""
    from safetensors.torch import load_file

    reference, other = load_file(reference_file), load_file(other_file)
    if set(reference) != set(other):
        return math.inf, f"different tensors: {sorted(set(reference) ^ set(other))[:4]}"
    worst, where = 0.0, None
    for key in reference:
        if reference[key].shape != other[key].shape:
            return math.inf, f"{key}: shape {tuple(reference[key].shape)} vs {tuple(other[key].shape)}"
        if reference[key].numel() == 0:
            continue
        first, second = reference[key].double(), other[key].double()
        difference = (first - second).abs().max().item() / max(first.abs().max().item(), 1e-30)
        if difference > worst:
            worst, where = difference, key
    return worst, where


def json_difference(reference, other, path="", skip=()) -> tuple[float, list[str]]:
    """(largest difference of the numbers, paths whose non-numbers or structure differ) of two JSON values;
    keys named in `skip` are not compared."""
    if isinstance(reference, bool) or isinstance(other, bool) or reference is None or other is None:
        return 0.0, [] if reference == other else [path or "/"]
    if isinstance(reference, (int, float)) and isinstance(other, (int, float)):
        return abs(reference - other), []
    if isinstance(reference, dict) and isinstance(other, dict):
        if set(reference) != set(other):
            return 0.0, [f"{path}/{{{','.join(sorted(set(reference) ^ set(other)))}}}"]
        pairs = [(reference[k], other[k], f"{path}/{k}") for k in reference if k not in skip]
    elif isinstance(reference, list) and isinstance(other, list):
        if len(reference) != len(other):
            return 0.0, [f"{path}[len {len(reference)} vs {len(other)}]"]
        pairs = [(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(reference, other))]
    else:
        return 0.0, [] if reference == other else [path or "/"]
    worst, mismatches = 0.0, []
    for a, b, sub in pairs:
        difference, bad = json_difference(a, b, sub, skip)
        worst, mismatches = max(worst, difference), mismatches + bad
    return worst, mismatches


def compare(reference: dict, other: dict, steps: int) -> dict:
    """Differences of run `other` to the one-process run `reference` (records of `run_training`), and the
    `problems`: tolerances exceeded, files that differ, ranks that disagree, or not the expected strategy."""
    ref_dir, other_dir = Path(reference["output_dir"]), Path(other["output_dir"])
    ref_train, ref_eval = logged_losses(ref_dir, steps)
    train, evaluation = logged_losses(other_dir, steps)
    summary = json.loads((other_dir / "run_summary.json").read_text())
    folder = "model" if other["kind"] == "pretrain" else "adapter"
    weights_file = "model.safetensors" if other["kind"] == "pretrain" else "adapter_model.safetensors"
    weights, weights_where = tensor_difference(ref_dir / folder / weights_file, other_dir / folder / weights_file)
    ref_files = {p.name for p in (ref_dir / folder).iterdir()}
    files = {p.name for p in (other_dir / folder).iterdir()}
    row = {
        "run": other["name"], "against": reference["name"],
        "distributed_type": summary["training"].get("distributed_type"),
        "world_size": summary["training"]["world_size"],
        "train_loss_steps": len(train), "train_loss": max_difference(ref_train, train),
        "eval_loss_steps": len(evaluation), "eval_loss": max_difference(ref_eval, evaluation),
        "weights": weights, "weights_worst_tensor": weights_where,
        "files_missing": sorted(ref_files - files), "files_extra": sorted(files - ref_files),
    }
    if other["kind"] == "sft":
        state = "dynamic_lora_state"
        tensors, tensors_where = tensor_difference(ref_dir / folder / f"{state}.safetensors",
                                                   other_dir / folder / f"{state}.safetensors")
        numbers, mismatches = json_difference(json.loads((ref_dir / folder / f"{state}.json").read_text()),
                                              json.loads((other_dir / folder / f"{state}.json").read_text()),
                                              skip=RANK_DEPENDENT_DYNAMICS)
        row.update({"dynamics": tensors, "dynamics_worst": tensors_where, "dynamics_numbers": numbers,
                    "dynamics_json_mismatches": mismatches[:10],
                    "ranks_agree": summary.get("dynamic_lora", {}).get("ranks_agree")})
    problems = [key for key in TOLERANCES if key in row and not row[key] <= TOLERANCES[key]]
    problems += [key for key in ("files_missing", "files_extra", "dynamics_json_mismatches") if row.get(key)]
    if row.get("ranks_agree") is False:
        problems.append("ranks_agree")
    expected_type = {"fsdp": "FSDP", "deepspeed": "DEEPSPEED"}.get(other["strategy"])
    if expected_type and row["distributed_type"] != expected_type:
        problems.append(f"distributed_type {row['distributed_type']} (expected {expected_type})")
    row["problems"] = problems
    return row


def print_table(rows: list[dict], skipped: list[dict], failed: list[dict]) -> None:
    print("largest differences to the one-process run: losses absolute, weights and dynamics tensors relative")
    header = (f"{'run':<32} {'type':<10} {'d train loss':>12} {'d eval loss':>11} {'d weights':>10} "
              f"{'d dynamics':>10} {'d dyn. nums':>11}  verdict")
    print(header)
    print("-" * len(header))
    for row in rows:
        name = row["run"] if "single" in row["against"] else f"{row['run']} vs ddp"
        dynamics = (f"{row['dynamics']:10.2e} {row['dynamics_numbers']:11.2e}" if "dynamics" in row
                    else f"{'-':>10} {'-':>11}")
        verdict = "ok" if not row["problems"] else "FAIL: " + ", ".join(row["problems"])
        print(f"{name:<32} {str(row['distributed_type']):<10} {row['train_loss']:12.2e} "
              f"{row['eval_loss']:11.2e} {row['weights']:10.2e} {dynamics}  {verdict}")
    for run in failed:
        print(f"{run['name']:<32} run failed (exit {run['returncode']}): {run['error'].strip().splitlines()[-1]}")
    for run in skipped:
        print(f"{run['name']:<32} skipped: {run['reason']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", choices=["pretrain", "sft"], default=["pretrain", "sft"])
    parser.add_argument("--strategies", nargs="+", choices=list(ACCELERATE_RECIPES), default=list(ACCELERATE_RECIPES))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--nproc", type=int, default=2, choices=[2, 4], help="processes of the multi-process runs")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (eval halfway and at the end)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=RESULTS / "distributed_check.json")
    parser.add_argument("--default-density-coupling", action="store_true",
                        help="sft with DynamicLoraConfig's default density_coupling (N processes then differ from one)")
    args = parser.parse_args(argv)
    if args.default_density_coupling:
        DYNAMIC_LORA.pop("density_coupling")

    work = args.work or Path(tempfile.mkdtemp(prefix="distributed_check_"))
    work.mkdir(parents=True, exist_ok=True)
    base = make_sft_base(work / "sft_base") if "sft" in args.kinds else work
    deepspeed_missing = deepspeed_status() if "deepspeed" in args.strategies else None
    rows, runs, skipped, failed = [], [], [], []
    for device, nproc in device_plans(args.device, args.nproc):
        for kind in args.kinds:
            reference = run_training(kind, "single", device, 1, args.steps, work, base, args.timeout)
            runs.append(reference)
            if reference["returncode"] != 0:
                failed.append(reference)
                continue
            strategies = args.strategies if nproc > 1 else [s for s in args.strategies if s == "fsdp"]
            for strategy in strategies:
                name = run_name(kind, strategy, device, nproc)
                if strategy == "deepspeed" and deepspeed_missing:
                    skipped.append({"name": name, "reason": f"deepspeed does not import: {deepspeed_missing}"})
                    continue
                if strategy == "deepspeed" and kind == "sft":
                    skipped.append({"name": name, "reason": "DynamicLoRA's dynamics read the factors' gradients, "
                                    "which DeepSpeed ZeRO does not keep in param.grad (DynamicLoraCallback "
                                    "refuses to start)"})
                    continue
                run = run_training(kind, strategy, device, nproc, args.steps, work, base, args.timeout)
                runs.append(run)
                if run["returncode"] != 0:
                    failed.append(run)
                    continue
                rows.append(compare(reference, run, args.steps))
                ddp = next((r for r in runs if r["name"] == run_name(kind, "ddp", device, nproc)), None)
                if strategy != "ddp" and ddp is not None and ddp["returncode"] == 0:
                    rows.append(compare(ddp, run, args.steps))  # the same world size: the tightest check
    print_table(rows, skipped, failed)
    import torch

    report = {"schema": "reso-hf/distributed_check/v1", "steps": args.steps, "global_batch": GLOBAL_BATCH,
              "dynamic_lora": DYNAMIC_LORA,
              "tolerances": TOLERANCES, "comparisons": rows, "skipped": skipped, "runs": runs,
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "cuda_devices": torch.cuda.device_count(),
                              "cuda_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.json} (runs in {work})")
    return 1 if failed or any(row["problems"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
