"""Recipes, exact resume after kill -9, atomic checkpoints, Trainer's files, and a 2-process CPU DDP run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments
from transformers.trainer_pt_utils import safe_globals

import reso_hf
from reso_hf.training import pretrain, sft
from reso_hf.training.arguments import parse_recipe, recipe_to_argv
from reso_hf.training.commands import split_recipe_argument

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_RECIPE = str(ROOT / "recipes/reso_llm/pretrain_sample.yaml")
MICRO = json.dumps(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, prime_code_dim=8, max_position_embeddings=128))
MICRO_FLAGS = ["--config_overrides", MICRO, "--block_size", "64", "--per_device_train_batch_size", "2",
               "--per_device_eval_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
               "--max_eval_samples", "4"]
CHECKPOINT_FILES = {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                    "training_args.json"}


def environment():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train_command(output_dir, *flags):
    return [sys.executable, "-m", "reso_hf.train", "--recipe", SAMPLE_RECIPE, "--output_dir", str(output_dir),
            *MICRO_FLAGS, *flags]


# ----------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe, types", [
    ("recipes/reso_llm/pretrain_sample.yaml", pretrain.ARGUMENT_TYPES),
    ("recipes/reso_llm/pretrain_guanaco.yaml", pretrain.ARGUMENT_TYPES),
    ("recipes/dynamic_lora/sft_guanaco.yaml", sft.ARGUMENT_TYPES),
])
def test_recipe_round_trips_into_the_dataclasses(recipe, types):
    import yaml

    values = yaml.safe_load((ROOT / recipe).read_text())
    parsed = parse_recipe(types, str(ROOT / recipe), [])
    for key, expected in values.items():
        owner = next(p for p in parsed if hasattr(p, key))
        actual = getattr(owner, key)
        if isinstance(expected, dict):
            actual = json.loads(actual)
        elif isinstance(expected, str) and not isinstance(actual, str):
            actual = getattr(actual, "value", actual)
            actual = actual[0] if isinstance(actual, list) and len(actual) == 1 else actual
        if key == "report_to":  # TrainingArguments normalises a single integration to a list, "none" to []
            expected = [] if expected == "none" else [expected]
            actual = getattr(owner, key)
        assert actual == expected, key


def test_cli_flags_override_the_recipe():
    model_args, data_args, training_args = parse_recipe(pretrain.ARGUMENT_TYPES, SAMPLE_RECIPE,
                                                        ["--max_steps", "7", "--block_size", "32"])
    assert (training_args.max_steps, data_args.block_size, model_args.model_preset) == (7, 32, "tiny")


def test_unknown_recipe_field_is_an_error_naming_it(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_preset: tiny\nlearnig_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown field 'learnig_rate'; did you mean \['learning_rate'"):
        parse_recipe(pretrain.ARGUMENT_TYPES, str(recipe), [])
    recipe.write_text("model_preset: huge\n")
    with pytest.raises(SystemExit):  # argparse's error, naming the field and the allowed values
        parse_recipe(pretrain.ARGUMENT_TYPES, str(recipe), [])
    assert "--model_preset/--model-preset: invalid choice: 'huge' (choose from 'tiny'" in capsys.readouterr().err


def test_yaml_values_get_cli_type_conversion():
    argv = recipe_to_argv({"learning_rate": "3e-4", "data_files": ["a.jsonl", "b.jsonl"], "packing": False,
                           "dynamic_lora": {"tiers": ["agent"]}}, sft.ARGUMENT_TYPES)
    sft_args, data_args, training_args = parse_recipe(sft.ARGUMENT_TYPES, None, argv)
    assert training_args.learning_rate == 3e-4 and data_args.data_files == ["a.jsonl", "b.jsonl"]
    assert data_args.packing is False and json.loads(sft_args.dynamic_lora) == {"tiers": ["agent"]}


# ----------------------------------------------------------------------------------------------- resume


def final_weights(output_dir):
    return load_file(os.path.join(output_dir, "model", "model.safetensors"))


def assert_complete_checkpoints(output_dir):
    names = sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-"))
    assert names, "no checkpoint was written"
    for name in names:
        folder = os.path.join(output_dir, name)
        assert CHECKPOINT_FILES <= set(os.listdir(folder)), f"{name} is incomplete: {os.listdir(folder)}"
        assert "training_args.bin" not in os.listdir(folder)  # replaced by training_args.json (no pickle)
        load_file(os.path.join(folder, "model.safetensors"))
        json.loads(Path(folder, "trainer_state.json").read_text())
        torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
        torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True)
        rng_files = [f for f in os.listdir(folder) if f.startswith("rng_state")]  # rng_state_<rank>.pth under DDP
        assert rng_files
        for rng_file in rng_files:
            with safe_globals():  # numpy RNG arrays allowlisted, still weights_only
                torch.load(os.path.join(folder, rng_file), weights_only=True)
    return names


@pytest.mark.timeout(300)
def test_kill_9_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    flags = ["--max_steps", "24", "--save_steps", "3", "--save_total_limit", "20", "--eval_strategy", "no"]
    reference = tmp_path / "reference"
    subprocess.run(train_command(reference, *flags), env=environment(), check=True, capture_output=True)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(train_command(interrupted, *flags), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (interrupted / "checkpoint-6").exists():
        assert process.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / "model").exists()  # it really was interrupted
    survivors = assert_complete_checkpoints(interrupted)  # whatever is on disk is complete

    resumed = subprocess.run(train_command(interrupted, *flags, "--resume"), env=environment(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((interrupted / "run_summary.json").read_text())
    assert summary["training"]["resumed_from"] == str(interrupted / survivors[-1])
    assert not (interrupted / ".staging").exists()
    card = (interrupted / "model" / "README.md").read_text()  # written once the run summary exists
    assert "reso-llm" in card and f"| optimizer steps | {summary['training']['global_step']} |" in card
    expected, actual = final_weights(reference), final_weights(interrupted)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        pretrain.resume_checkpoint(str(tmp_path), True)


# ----------------------------------------------------------------------------------------------- DDP


def torchrun(module, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", module,
            *args]


@pytest.mark.timeout(300)
def test_two_process_cpu_ddp_pretrain_trains_evaluates_and_saves(tmp_path):
    output = tmp_path / "ddp"
    command = torchrun("reso_hf.train", "--recipe", SAMPLE_RECIPE, "--output_dir", str(output), *MICRO_FLAGS,
                       "--max_steps", "3", "--eval_steps", "3", "--save_steps", "3", "--ddp_find_unused_parameters",
                       "false")
    result = subprocess.run(command, env=environment(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["training"]["world_size"] == 2 and summary["training"]["global_step"] == 3
    assert summary["eval"]["eval_loss"] > 0
    assert assert_complete_checkpoints(output) == ["checkpoint-3"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(output / "checkpoint-3"))
    assert (output / "model" / "model.safetensors").exists()


@pytest.mark.timeout(300)
def test_two_process_cpu_ddp_sft_keeps_dynamic_lora_state_identical_across_ranks(tmp_path):
    torch.manual_seed(0)
    tokenizer = reso_hf.create_default_tokenizer()
    config = reso_hf.tiny_config(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 **json.loads(MICRO))
    reso_hf.ResoLLMForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    output = tmp_path / "sft"
    lora = json.dumps({"target_modules": ["q_proj", "v_proj"], "autocorr_window": 2,
                       "tier_ranks": {"foundation": 4, "domain": 4, "swarm": 2, "agent": 2, "context": 2}})
    command = torchrun("reso_hf.cli", "sft", "--base_model", str(tmp_path / "base"), "--use_bundled_sample", "true",
                       "--output_dir", str(output), "--dynamic_lora", lora, "--block_size", "64",
                       "--per_device_train_batch_size", "2", "--max_steps", "4", "--save_steps", "4",
                       "--eval_strategy", "no", "--report_to", "none", "--use_cpu", "true",
                       "--ddp_find_unused_parameters", "false")
    result = subprocess.run(command, env=environment(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "run_summary.json").read_text())
    digests = summary["dynamic_lora"]["dynamics_digest_per_rank"]
    # horizontal resonance is off (safe mode): DDP averages every tier's gradient, so the whole dynamics
    # state (importance, phases, thresholds, EMAs) must be the same on both ranks
    assert len(digests) == 2 and summary["dynamic_lora"]["ranks_agree"] is True
    assert summary["dynamic_lora"]["health"]["health"] in {"HEALTHY", "ACCEPTABLE", "DEGRADED"}
    assert (output / "adapter" / "adapter_model.safetensors").exists()
    assert (output / "checkpoint-4" / "dynamic_lora_state.safetensors").exists()


def distributed_check():
    """benchmarks/distributed_check.py as a module (its run flags and comparisons)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("distributed_check", ROOT / "benchmarks" / "distributed_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_two_process_cpu_fsdp_pretrain_and_sft_match_one_process(tmp_path):
    """recipes/accelerate/fsdp.yaml on 2 CPU processes against one process with the same global batch: the same
    losses (train and eval), the same saved model and adapter, the same DynamicLoRA dynamics state."""
    check = distributed_check()
    steps = 4
    base = check.make_sft_base(tmp_path / "base")
    runs = {(kind, processes): {"name": check.run_name(kind, "fsdp" if processes > 1 else "single", "cpu", processes),
                                "kind": kind, "strategy": "fsdp" if processes > 1 else "single",
                                "output_dir": str(tmp_path / f"{kind}-{processes}")}
            for kind in ("pretrain", "sft") for processes in (1, 2)}
    flags = {key: check.training_arguments(key[0], steps, check.GLOBAL_BATCH // key[1], "cpu",
                                           Path(run["output_dir"]), base) for key, run in runs.items()}
    launch = check.launch_command("fsdp", 2, "cpu") + [str(ROOT / "tests" / "fsdp_worker.py"), json.dumps(
        [[kind, flags[kind, 2]] for kind in ("pretrain", "sft")])]
    fsdp = subprocess.Popen(launch, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for kind, module in (("pretrain", pretrain), ("sft", sft)):  # the references, meanwhile, in this process
        module.run(*parse_recipe(module.ARGUMENT_TYPES, *split_recipe_argument(flags[kind, 1])), quiet=True)
    _, stderr = fsdp.communicate(timeout=280)
    assert fsdp.returncode == 0, stderr[-3000:]
    for kind in ("pretrain", "sft"):
        row = check.compare(runs[kind, 1], runs[kind, 2], steps)
        assert row["distributed_type"] == "FSDP" and row["world_size"] == 2, row  # not DDP in disguise
        assert row["train_loss_steps"] == steps and row["eval_loss_steps"] == 2
        assert row["train_loss"] < 1e-5 and row["eval_loss"] < 1e-5, row  # eval after 2 and 4 steps
        assert row["weights"] < 1e-4, row  # relative to each tensor's largest magnitude
        assert row["files_missing"] == row["files_extra"] == [], row  # no torch FSDP sources, no lm_head copy
        if kind == "sft":
            assert row["dynamics"] < 1e-4 and row["dynamics_numbers"] < 1e-5 and row["ranks_agree"], row
            assert row["dynamics_json_mismatches"] == [], row
        assert row["problems"] == [], row
    model_dir = tmp_path / "pretrain-2" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_reso_llm.ResoLLMForCausalLM"
    assert "lm_head.weight" not in load_file(model_dir / "model.safetensors")  # tied, as a one-process save
    checkpoint = tmp_path / "pretrain-2" / f"checkpoint-{steps}"
    assert {"model.safetensors", "config.json", "training_args.json", "pytorch_model_fsdp_0"} <= set(
        os.listdir(checkpoint))  # the whole model next to FSDP's sharded resume files


@pytest.mark.parametrize("name, kind", [("single_cpu", "NO"), ("single_gpu", "NO"), ("multi_gpu_ddp", "MULTI_GPU"),
                                        ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind


# ----------------------------------------------------------------------------------------------- eval, tokenizer, sft


def save_micro_model(directory):
    torch.manual_seed(0)
    tokenizer = reso_hf.create_default_tokenizer()
    config = reso_hf.tiny_config(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 **json.loads(MICRO))
    reso_hf.ResoLLMForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_eval_writes_eval_results_with_loss_perplexity_and_samples(tmp_path):
    from reso_hf.cli import main

    model_dir = save_micro_model(tmp_path / "model")
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": f"### Human: q{i}?### Assistant: answer {i}."}) + "\n"
                            for i in range(6)) + json.dumps({"text": "no markers"}) + "\n")
    assert main(["eval", "--model", model_dir, "--data", str(data), "--num_samples", "2", "--max_new_tokens", "4",
                 "--block_size", "64"]) == 0
    results = json.loads(Path(model_dir, "eval_results.json").read_text())
    assert results["schema"] == "reso-hf/eval_results/v1"
    assert results["dataset"]["rows"] == 7 and results["dataset"]["malformed_rows"] == 1
    assert results["perplexity"] == pytest.approx(2.718281828 ** results["loss"])
    assert [m["type"] for m in results["metrics"]] == ["loss", "perplexity"]
    assert [s["prompt"] for s in results["samples"]] == ["q0?", "q1?"]
    assert results["stability"]["count"] == 2  # ResoLLM telemetry through the local `stability` metric
    # The model card is (re)written with the model-index taken from these measured results.
    from huggingface_hub import ModelCard

    card = ModelCard.load(Path(model_dir, "README.md"))
    metrics = card.data.eval_results
    assert {m.metric_type: m.metric_value for m in metrics} == {"loss": results["loss"],
                                                                  "perplexity": results["perplexity"]}


def test_train_tokenizer_command(tmp_path):
    from transformers import AutoTokenizer

    from reso_hf.cli import main

    assert main(["train-tokenizer", "--vocab_size", "300", "--use_bundled_sample", "true",
                 "--output_dir", str(tmp_path / "tok")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert 259 < len(tokenizer) <= 300 and tokenizer.decode(tokenizer("¿Qué?")["input_ids"]) == "¿Qué?"


def test_sft_on_a_llama_trains_only_the_adapter_and_reports_health(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = reso_hf.create_default_tokenizer()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2))
    llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    arguments = parse_recipe(sft.ARGUMENT_TYPES, str(ROOT / "recipes/dynamic_lora/sft_guanaco.yaml"), [
        "--base_model", str(tmp_path / "llama"), "--use_bundled_sample", "true", "--block_size", "64",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--max_train_samples", "20", "--max_eval_samples", "4",
        "--dynamic_lora", json.dumps({"target_modules": ["q_proj", "v_proj"],
                                      "tier_ranks": {"foundation": 4, "domain": 4, "swarm": 2, "agent": 2,
                                                     "context": 2}})])
    summary = sft.run(*arguments, quiet=True)
    assert summary["kind"] == "sft" and summary["training"]["global_step"] == 3
    assert 0 < summary["model"]["trainable_parameters"] < summary["model"]["parameters"]
    assert summary["dynamic_lora"]["health"]["health"] in {"HEALTHY", "ACCEPTABLE", "DEGRADED", "CRITICAL"}
    assert summary["data"]["assistant_only_loss"] is True
    assert (tmp_path / "out" / "dynamic_lora_dynamics.png").stat().st_size > 0
    assert (tmp_path / "out" / "adapter" / "dynamic_lora_state.safetensors").exists()
