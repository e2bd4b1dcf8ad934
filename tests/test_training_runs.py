"""Recipes, exact resume after kill -9, atomic checkpoints, Trainer's files, and a 2-process CPU DDP run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments
from transformers.trainer_pt_utils import safe_globals

import reso_hf
from reso_hf.training import pretrain, sft
from reso_hf.training.arguments import ArgumentError, parse_recipe, recipe_to_argv
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
    ("recipes/reso_llm/sft_smollm2_resonant.yaml", sft.ARGUMENT_TYPES),
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


def test_unknown_recipe_field_is_an_error_naming_it(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_preset: tiny\nlearnig_rate: 0.1\n")
    with pytest.raises(ArgumentError, match=r"bad\.yaml: unknown field 'learnig_rate'; did you mean \['learning_rate'"):
        parse_recipe(pretrain.ARGUMENT_TYPES, str(recipe), [])


@pytest.mark.parametrize("recipe, flags, message", [
    # a bad recipe value names the recipe file and the field
    ("model_preset: huge\n", [], r"^RECIPE: field 'model_preset': invalid choice: 'huge' \(choose from 'tiny', "),
    ("learning_rate: fast\n", [], r"^RECIPE: field 'learning_rate': invalid float value: 'fast'$"),
    ("max_steps: [10, 20]\n", [], r"^RECIPE: field 'max_steps' takes one integer, got the list \[10, 20\]$"),
    ("max_steps: [10]\n", [], r"^RECIPE: field 'max_steps' takes one integer, got the list \[10\]$"),
    ("seed: {a: 1}\n", [], r"^RECIPE: field 'seed' takes one integer, got the mapping \{'a': 1\}$"),
    ("learning_rate: -3.0e-4\n", [], r"^RECIPE: learning_rate must be >= 0, got -0\.0003$"),
    ("per_device_train_batch_size: 0\n", [], r"^RECIPE: per_device_train_batch_size must be >= 1, got 0$"),
    ("adam_beta2: 1.5\n", [], r"^RECIPE: adam_beta2 must be in \[0, 1\), got 1\.5$"),
    ("max_steps: 0\n", [], r"^RECIPE: max_steps must be > 0, or -1 to train num_train_epochs, got 0$"),
    ("config_overrides: '{bad'\n", [], r"^RECIPE: config_overrides must be a JSON object \(a mapping in YAML\)"),
    ("[1, 2]\n", [], r"^RECIPE: a recipe must be a YAML mapping of field: value, got list$"),
    ("a: [1\n", [], r"^RECIPE: not valid YAML: while parsing a flow sequence"),
    # a bad flag names the flag
    ("", ["--max_stepz", "3"], r"^unknown flag --max_stepz; did you mean --max_steps\?$"),
    ("", ["--max_step", "3"], r"^unknown flag --max_step; did you mean --max_steps"),  # no silent abbreviation
    ("", ["--max_steps", "3", "4"], r"^unexpected value '4'"),
    ("", ["--learning_rate", "fast"], r"^--learning_rate: invalid float value: 'fast'$"),
    ("learning_rate: 0.1\n", ["--learning_rate", "-1"], r"^learning_rate must be >= 0, got -1\.0$"),
])
def test_bad_recipe_values_and_flags_are_named_before_anything_is_loaded(tmp_path, recipe, flags, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    with pytest.raises(ArgumentError, match=message.replace("RECIPE", re.escape(str(path)))):
        parse_recipe(pretrain.ARGUMENT_TYPES, str(path), flags)


def test_a_missing_recipe_is_named():
    with pytest.raises(FileNotFoundError, match=r"^recipe file 'missing\.yaml' does not exist$"):
        parse_recipe(pretrain.ARGUMENT_TYPES, "missing.yaml", [])


def test_a_negative_learning_rate_fails_before_the_data_is_loaded(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("data loaded before the arguments were checked")

    monkeypatch.setattr(pretrain, "build_datasets", no_loading)
    monkeypatch.setattr(pretrain, "build_tokenizer", no_loading)
    with pytest.raises(ArgumentError, match="learning_rate must be >= 0, got -0.001"):
        pretrain.main(SAMPLE_RECIPE, ["--learning_rate", "-0.001", "--output_dir", str(tmp_path)])


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
    uninterrupted = json.loads((reference / "run_summary.json").read_text())
    assert summary["training"]["train_loss"] == pytest.approx(uninterrupted["training"]["train_loss"], rel=1e-6)
    assert not (interrupted / ".staging").exists()
    card = (interrupted / "model" / "README.md").read_text()  # written once the run summary exists
    assert "reso-llm" in card and f"| optimizer steps | {summary['training']['global_step']} |" in card
    expected, actual = final_weights(reference), final_weights(interrupted)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        pretrain.run(*parse_recipe(pretrain.ARGUMENT_TYPES, SAMPLE_RECIPE, ["--output_dir", str(tmp_path), "--resume"]))


# ----------------------------------------------------------------------------------------------- output folder


def micro_run(output_dir, *flags):
    arguments = parse_recipe(pretrain.ARGUMENT_TYPES, SAMPLE_RECIPE, [
        "--output_dir", str(output_dir), *MICRO_FLAGS, "--max_steps", "6", "--save_steps", "3", "--save_total_limit",
        "10", "--eval_strategy", "no", "--max_train_samples", "24", "--disable_tqdm", "true", *flags])
    return pretrain.run(*arguments, quiet=True)


def folder_snapshot(output_dir):
    return {str(path.relative_to(output_dir)): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(Path(output_dir).rglob("*")) if path.is_file()}


def test_output_dir_holding_a_run_is_refused_resumed_finished_or_overwritten(tmp_path, capsys):
    from reso_hf.training.run_folder import OutputDirError

    previous_umask = os.umask(0o022)
    try:
        reference = micro_run(tmp_path / "run")
    finally:
        os.umask(previous_umask)
    out = tmp_path / "run"
    assert (out / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o644  # the umask's mode, not 0600
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    fingerprint = json.loads((out / "run_fingerprint.json").read_text())
    assert fingerprint["fields"]["seed"] == 0 and fingerprint["data_files"]["train"][0]["file"] == "(bundled sample)"
    assert "output_dir" not in fingerprint["fields"] and "logging_steps" not in fingerprint["fields"]
    finished = folder_snapshot(out)
    capsys.readouterr()

    # the same finished run again, or --resume of it: nothing to do, nothing touched (item 3)
    assert micro_run(out) == reference
    assert capsys.readouterr().out.strip() == (f"{out} already holds this run, finished at step 6 of 6; nothing to "
                                               f"do (--overwrite_output_dir trains it again)")
    assert micro_run(out, "--resume") == reference
    assert capsys.readouterr().out.strip() == f"{out} holds a finished run (step 6 of 6); nothing to do"
    assert folder_snapshot(out) == finished

    # a different run is refused, naming the folder, what differs and both options (item 2)
    with pytest.raises(OutputDirError, match=re.escape(
            f"{out} already holds a different run (learning_rate: 0.003 -> 0.001; seed: 0 -> 1); --resume continues "
            f"it, --overwrite_output_dir deletes it and starts this run, or choose another --output_dir")):
        micro_run(out, "--seed", "1", "--learning_rate", "0.001")
    assert folder_snapshot(out) == finished

    # killed after its last checkpoint, before model/ was written: finished from checkpoint-6 without training
    # one step more (Trainer alone went to step 7 of 6), same weights and the whole run's mean loss (items 3, 4)
    shutil.rmtree(out / "model")
    (out / "run_summary.json").unlink()
    restored = micro_run(out, "--resume")
    assert restored["training"]["global_step"] == 6 and restored["training"]["resumed_from"] == str(out / "checkpoint-6")
    assert restored["training"]["train_loss"] == pytest.approx(reference["training"]["train_loss"], rel=1e-9)
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(out))

    # killed after checkpoint-3: the resumed run reports the mean loss of all 6 steps, not of steps 4-6 (item 4)
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "checkpoint-6")
    (out / "run_summary.json").unlink()
    resumed = micro_run(out, "--resume")
    assert resumed["training"]["global_step"] == 6 and resumed["training"]["resumed_from"] == str(out / "checkpoint-3")
    assert resumed["training"]["train_loss"] == pytest.approx(reference["training"]["train_loss"], rel=1e-6)
    card = (out / "model" / "README.md").read_text()
    assert f"| final mean training loss | {resumed['training']['train_loss']:.4g}" in card

    # --overwrite_output_dir replaces the run: the old checkpoints are gone, the new fingerprint is recorded
    (out / "notes.txt").write_text("not written by a run")
    replaced = micro_run(out, "--seed", "1", "--overwrite_output_dir", "--max_steps", "3")
    assert replaced["training"]["global_step"] == 3 and replaced["training"]["seed"] == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert json.loads((out / "run_fingerprint.json").read_text())["fields"]["seed"] == 1
    assert (out / "notes.txt").read_text() == "not written by a run"  # only what a run writes is deleted

    # a run written without a fingerprint (older reso-hf) is not replaced silently either
    (out / "run_fingerprint.json").unlink()
    with pytest.raises(OutputDirError, match=r"already holds a run \(checkpoint-3, model/, run_summary.json\) with "
                                             r"no run_fingerprint.json to compare with; --resume continues it"):
        micro_run(out, "--seed", "1", "--max_steps", "3")
    with pytest.raises(OutputDirError, match="give only one of them"):
        micro_run(out, "--resume", "--overwrite_output_dir")


def assert_same_weights(expected, actual):
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


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


def killed_by_native_abort(stderr: str) -> bool:
    """Whether torchrun reports a rank killed by SIGABRT (a native abort, not a Python exception)."""
    return "Signal 6 (SIGABRT)" in stderr  # a Python exception in a rank exits with code 1 instead


def distributed_check():
    """benchmarks/distributed_check.py as a module (its run flags and comparisons)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("distributed_check", ROOT / "benchmarks" / "distributed_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(450)
def test_two_process_cpu_fsdp_pretrain_and_sft_match_one_process(tmp_path):
    """recipes/accelerate/fsdp.yaml on 2 CPU processes against one process with the same global batch: the same
    losses (train and eval), the same saved model and adapter, the same DynamicLoRA dynamics state; and an FSDP
    SFT run resumed halfway ends where the uninterrupted one does."""
    check = distributed_check()
    steps = 4
    base = check.make_sft_base(tmp_path / "base")
    runs = {(kind, processes): {"name": check.run_name(kind, "fsdp" if processes > 1 else "single", "cpu", processes),
                                "kind": kind, "strategy": "fsdp" if processes > 1 else "single",
                                "output_dir": str(tmp_path / f"{kind}-{processes}")}
            for kind in ("pretrain", "sft") for processes in (1, 2)}
    flags = {key: check.training_arguments(key[0], steps, check.GLOBAL_BATCH // key[1], "cpu",
                                           Path(run["output_dir"]), base) for key, run in runs.items()}
    for kind in ("pretrain", "sft"):  # a checkpoint halfway too, for the resumed run
        flags[kind, 2][flags[kind, 2].index("--save_steps") + 1] = str(steps // 2)
    resumed = tmp_path / "sft-2-resumed"
    resume_flags = [str(resumed) if flag == runs["sft", 2]["output_dir"] else flag for flag in flags["sft", 2]]
    launch = check.launch_command("fsdp", 2, "cpu") + [str(ROOT / "tests" / "fsdp_worker.py"), json.dumps(
        [["pretrain", flags["pretrain", 2]], ["sft", flags["sft", 2]],
         ["sft", resume_flags + ["--resume", "true"], runs["sft", 2]["output_dir"]]])]
    fsdp = subprocess.Popen(launch, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for kind, module in (("pretrain", pretrain), ("sft", sft)):  # the references, meanwhile, in this process
        module.run(*parse_recipe(module.ARGUMENT_TYPES, *split_recipe_argument(flags[kind, 1])), quiet=True)
    _, stderr = fsdp.communicate(timeout=200)
    if fsdp.returncode != 0 and killed_by_native_abort(stderr):
        # gloo on an oversubscribed 2-core machine has aborted a rank natively ("terminate called without an active
        # exception", SIGABRT) a few times in hundreds of runs, never with a Python error; one clean relaunch tells
        # that apart from a real failure, which repeats. faulthandler in the worker prints the aborting stacks.
        warnings.warn(f"FSDP worker aborted natively, relaunched once; its stderr ended:\n{stderr[-1500:]}")
        for folder in (runs["pretrain", 2]["output_dir"], runs["sft", 2]["output_dir"], resumed):
            shutil.rmtree(folder, ignore_errors=True)
        launch[launch.index("--main_process_port") + 1] = str(check.free_port())
        retry = subprocess.run(launch, env=environment(), capture_output=True, text=True, timeout=200)
        fsdp.returncode, stderr = retry.returncode, retry.stderr
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
    # resumed from the halfway checkpoint (FSDP's sharded files, the dynamics state against whole factors): the
    # same adapter and dynamics state, bit for bit
    summary = json.loads((resumed / "run_summary.json").read_text())
    assert summary["training"]["resumed_from"] == str(resumed / f"checkpoint-{steps // 2}")
    for name in ("adapter_model.safetensors", "dynamic_lora_state.safetensors"):
        expected, actual = load_file(tmp_path / "sft-2" / "adapter" / name), load_file(resumed / "adapter" / name)
        assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected), name
    assert (json.loads((resumed / "adapter" / "dynamic_lora_state.json").read_text())
            == json.loads((tmp_path / "sft-2" / "adapter" / "dynamic_lora_state.json").read_text()))


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
    # a file given for evaluation is its dataset's test split, named by the file, not by its local path
    assert (results["dataset"]["name"], results["dataset"]["split"]) == ("held_out.jsonl", "test")
    assert results["dataset"]["assistant_only_loss"] is True  # no run_summary.json: the default, and it says so
    assert results["dataset"]["assistant_only_loss_from"] == "default: the model folder has no run_summary.json"
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
    assert {(m.dataset_name, m.dataset_type, m.dataset_split) for m in metrics} == {("held_out.jsonl", "local", "test")}
    assert str(tmp_path) not in card.content


def test_eval_scores_the_tokens_the_model_was_trained_on_by_default(tmp_path, capsys):
    from reso_hf.cli import main
    from reso_hf.training.evaluate import ARGUMENT_TYPES, evaluation_split

    model_dir = save_micro_model(tmp_path / "model")
    summary = {"schema": "reso-hf/run_summary/v1", "kind": "pretrain", "model": {}, "training": {},
               "data": {"assistant_only_loss": False}}  # pretrained on every token
    Path(model_dir, "run_summary.json").write_text(json.dumps(summary))
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": f"### Human: question {i}?### Assistant: answer {i}."}) + "\n"
                            for i in range(4)))
    common = ["--data", str(data), "--num_samples", "0", "--block_size", "64"]
    results = {}
    for name, flags in (("default", []), ("all", ["--assistant_only_loss", "false"]),
                        ("assistant", ["--assistant_only_loss", "true"])):
        assert main(["eval", "--model", model_dir, "--output_file", str(tmp_path / f"{name}.json"), *common, *flags]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    printed = capsys.readouterr().out
    assert "loss on every token, as the model was trained (run_summary.json); held_out.jsonl, split test)" in printed
    assert results["default"]["dataset"]["assistant_only_loss"] is False
    assert results["default"]["loss"] == results["all"]["loss"] and results["default"]["tokens"] == results["all"]["tokens"]
    assert results["assistant"]["tokens"] < results["all"]["tokens"]
    assert results["all"]["dataset"]["assistant_only_loss_from"] == "--assistant_only_loss"

    # the recorded split of the other evaluation sources
    _, data_args = parse_recipe(ARGUMENT_TYPES, None, ["--use_bundled_sample", "true"])
    assert evaluation_split(data_args, None) == ("eval", "reso-hf guanaco sample", "train, held-out 0.1 (split_seed 0)")
    _, data_args = parse_recipe(ARGUMENT_TYPES, None, ["--dataset_name", "org/data", "--eval_split", "validation"])
    assert evaluation_split(data_args, None) == ("eval", "org/data", "validation")
    _, data_args = parse_recipe(ARGUMENT_TYPES, None, ["--data_files", "a/train.jsonl", "--eval_data_files", "b/dev.jsonl"])
    assert evaluation_split(data_args, None) == ("eval", "dev.jsonl", "test")


def test_train_tokenizer_command(tmp_path):
    from transformers import AutoTokenizer

    from reso_hf.cli import main

    assert main(["train-tokenizer", "--vocab_size", "300", "--use_bundled_sample", "true",
                 "--output_dir", str(tmp_path / "tok")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert 259 < len(tokenizer) <= 300 and tokenizer.decode(tokenizer("¿Qué?")["input_ids"]) == "¿Qué?"


def save_tiny_llama(directory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = reso_hf.create_default_tokenizer()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2))
    llama.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_sft_on_a_llama_trains_only_the_adapter_and_reports_health(tmp_path):
    arguments = parse_recipe(sft.ARGUMENT_TYPES, str(ROOT / "recipes/dynamic_lora/sft_guanaco.yaml"), [
        "--base_model", save_tiny_llama(tmp_path / "llama"), "--use_bundled_sample", "true", "--block_size", "64",
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


def test_sft_resumed_after_a_kill_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # Migrations, fast-tracks and threshold changes happen before and after the checkpoint (window 2), so the
    # resumed run needs every part of the dynamics state: init_A, anchors, importance, phases, queue, ring.
    lora = json.dumps({"target_modules": ["q_proj", "v_proj"], "autocorr_window": 2, "stable_windows": 1,
                       "stability_threshold": 0.05, "vertical_threshold": 0.0,
                       "tier_ranks": {"foundation": 4, "domain": 4, "swarm": 2, "agent": 2, "context": 2}})
    base = save_tiny_llama(tmp_path / "llama")

    def run(output_dir, *flags):
        return sft.run(*parse_recipe(sft.ARGUMENT_TYPES, str(ROOT / "recipes/dynamic_lora/sft_guanaco.yaml"), [
            "--base_model", base, "--use_bundled_sample", "true", "--block_size", "64", "--output_dir",
            str(output_dir), "--max_steps", "10", "--save_steps", "5", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2", "--eval_strategy", "no",
            "--report_to", "none", "--use_cpu", "true", "--max_train_samples", "40", "--dynamic_lora", lora,
            *flags]), quiet=True)

    reference = tmp_path / "reference"
    run(reference)
    # What a run killed (kill -9) between its checkpoints 5 and 10 leaves on disk: checkpoint publication is
    # atomic (see test_kill_9_then_resume_is_bit_identical_to_an_uninterrupted_run), nothing else is written
    # before the end of training.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(reference / "checkpoint-5", interrupted / "checkpoint-5")
    summary = run(interrupted, "--resume", "true")
    assert summary["training"]["resumed_from"] == str(interrupted / "checkpoint-5")

    expected_dir, actual_dir = reference / "adapter", interrupted / "adapter"
    audit = [json.loads(line) for line in (expected_dir / "dynamic_lora_audit.jsonl").read_text().splitlines()]
    events = {entry["event"] for entry in audit}
    assert {"migration", "threshold_change"} <= events
    assert any(e["event"] == "migration" and e["step"] < 5 for e in audit)
    assert any(e["event"] == "migration" and e["step"] > 5 for e in audit)
    for name in ("adapter_model.safetensors", "dynamic_lora_state.safetensors"):
        expected, actual = load_file(expected_dir / name), load_file(actual_dir / name)
        assert expected.keys() == actual.keys(), name
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (name, key)
    for name in ("dynamic_lora_state.json", "dynamic_lora_audit.jsonl"):
        assert (expected_dir / name).read_text() == (actual_dir / name).read_text(), name
