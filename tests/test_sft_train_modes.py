"""`reso-hf sft --train {dynamic_lora,resonant,resonant+dynamic_lora,full}` (issue 13, training the resonant parts):
each mode trains exactly its parameters, saves them where it says, and the saved folder reloads the trained model."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import reso_hf
from reso_hf.conversion import resonant_parameter_names
from reso_hf.loading import load_causal_lm
from reso_hf.training import sft
from reso_hf.training.arguments import ArgumentError, SftArguments, parse_recipe
from reso_hf.training.run_folder import fingerprint_differences, run_fingerprint

ROOT = Path(__file__).resolve().parent.parent
SFT_RECIPE = str(ROOT / "recipes/dynamic_lora/sft_guanaco.yaml")
LORA = json.dumps({"target_modules": ["q_proj", "v_proj"],
                   "tier_ranks": {"foundation": 2, "domain": 2, "swarm": 2, "agent": 2, "context": 2}})
PROBE_IDS = torch.tensor([[1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """At these sizes a second intra-op thread only adds synchronisation (about 20x slower per op on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama():
    torch.manual_seed(0)
    vocab_size = len(reso_hf.create_default_tokenizer())
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Folders of a tiny Llama, of its conversion with every component on, and of one with every component off."""
    root = tmp_path_factory.mktemp("bases")
    tokenizer = reso_hf.create_default_tokenizer()
    llama = tiny_llama()
    folders = {"llama": root / "llama", "resonant": root / "resonant", "switches_off": root / "switches_off"}
    llama.save_pretrained(folders["llama"])
    converted = reso_hf.ResoLLMForCausalLM.from_llama(llama, prime_embedding=True, kuramoto=True,
                                                     coherence_gating=True)
    # Conversion starts every component at its no-op, where the gates' sigmoid is saturated (no gradient at all)
    # and the coupling has none at the first step. Here the components start as after some training, so that
    # every parameter a mode trains gets a gradient at once and "trained" can be checked as "changed".
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in converted.named_parameters():
            if name in resonant_parameter_names(converted):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        for layer in converted.model.layers:
            layer.coherence_gate.score.bias.fill_(3.0)
    converted.save_pretrained(folders["resonant"])
    reso_hf.ResoLLMForCausalLM.from_llama(llama).save_pretrained(folders["switches_off"])
    for folder in folders.values():
        tokenizer.save_pretrained(folder)
    return {name: str(folder) for name, folder in folders.items()}


@pytest.fixture
def trainers(monkeypatch):
    """The trainers `sft.run` makes, each with a copy of its model's parameters as training starts."""
    made = []

    class RecordingTrainer(sft.AtomicCheckpointTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.initial_parameters = {name: p.detach().clone() for name, p in self.model.named_parameters()}
            made.append(self)

    monkeypatch.setattr(sft, "AtomicCheckpointTrainer", RecordingTrainer)
    return made


def sft_arguments(base, output_dir, *flags):
    return parse_recipe(sft.ARGUMENT_TYPES, SFT_RECIPE, [
        "--base_model", base, "--use_bundled_sample", "true", "--block_size", "64", "--output_dir", str(output_dir),
        "--max_steps", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--learning_rate", "1e-2", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "true", "--max_train_samples", "12", "--max_eval_samples", "2", "--dynamic_lora", LORA, *flags])


def expected_trainable(mode: str, names: list[str], resonant: set[str]) -> set[str]:
    """What `mode` trains, by parameter name (the PEFT model's names for the adapter modes)."""
    adapter = {name for name in names if ".dynamic_lora_A." in name or ".dynamic_lora_B." in name}
    if mode == "dynamic_lora":
        return adapter
    if mode == "resonant":
        return resonant
    if mode == "full":
        return set(names)
    # PEFT's modules_to_save: a trained copy of each resonant module, under modules_to_save.default
    copies = {name for name in names if ".modules_to_save.default." in name}
    assert {name.removeprefix("base_model.model.").replace("modules_to_save.default.", "") for name in copies} \
        == resonant
    return adapter | copies


@pytest.mark.parametrize("mode, final_folder", [
    ("dynamic_lora", "adapter"), ("resonant", "model"), ("resonant+dynamic_lora", "adapter"), ("full", "model")])
def test_each_mode_trains_exactly_its_parameters_and_its_folder_reloads_the_trained_model(
        bases, trainers, tmp_path, mode, final_folder):
    output_dir = tmp_path / "out"
    summary = sft.run(*sft_arguments(bases["resonant"], output_dir, "--train", mode), quiet=True)
    (trainer,) = trainers
    model = trainer.model
    names = [name for name, _ in model.named_parameters()]
    resonant = set(resonant_parameter_names(reso_hf.ResoLLMForCausalLM.from_pretrained(bases["resonant"])))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == expected_trainable(mode, names, resonant)
    for name, parameter in model.named_parameters():
        unchanged = torch.equal(parameter.detach(), trainer.initial_parameters[name])
        assert unchanged == (name not in trainable), f"{name}: trained={name in trainable}, unchanged={unchanged}"

    assert summary["model"]["train"] == mode
    assert summary["model"]["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary["artifacts"]["model_dir"] == str(output_dir / final_folder)
    assert sorted(p.name for p in output_dir.iterdir() if p.name in ("adapter", "model")) == [final_folder]
    assert (output_dir / "dynamic_lora_dynamics.png").exists() == (final_folder == "adapter")
    assert json.loads((output_dir / "run_fingerprint.json").read_text())["fields"]["train"] == mode

    model.eval()
    reloaded = load_causal_lm(str(output_dir / final_folder))
    with torch.no_grad():
        assert torch.equal(reloaded(PROBE_IDS).logits, model(PROBE_IDS).logits)
    if mode == "resonant":  # only the resonant tensors differ from the base folder
        before = load_file(Path(bases["resonant"], "model.safetensors"))
        after = load_file(output_dir / "model/model.safetensors")
        assert before.keys() == after.keys()
        assert {key for key in before if not torch.equal(before[key], after[key])} == resonant
    if mode == "resonant+dynamic_lora":  # the adapter folder holds the trained resonant weights
        saved, trained = load_file(output_dir / "adapter/adapter_model.safetensors"), dict(model.named_parameters())
        for name in resonant:
            module = next(m for m in sft.RESONANT_MODULES if f".{m}." in f".{name}")
            copy = "base_model.model." + f".{name}".replace(f".{module}.", f".{module}.modules_to_save.default.")[1:]
            assert torch.equal(saved[f"base_model.model.{name}"], trained[copy].detach()), name


@pytest.mark.parametrize("mode, saved_files", [
    ("resonant", ["model/model.safetensors"]),
    ("resonant+dynamic_lora", ["adapter/adapter_model.safetensors", "adapter/dynamic_lora_state.safetensors"]),
    ("full", ["model/model.safetensors"])])
def test_resume_from_a_checkpoint_is_bit_identical_to_an_uninterrupted_run(bases, tmp_path, mode, saved_files):
    flags = ["--train", mode, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"]
    reference = tmp_path / "reference"
    sft.run(*sft_arguments(bases["resonant"], reference, *flags), quiet=True)
    # what a run killed between its checkpoints 1 and 2 leaves (checkpoints are published atomically)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(reference / "checkpoint-1", interrupted / "checkpoint-1")
    summary = sft.run(*sft_arguments(bases["resonant"], interrupted, *flags, "--resume", "true"), quiet=True)
    assert summary["training"]["resumed_from"] == str(interrupted / "checkpoint-1")
    assert summary["training"]["global_step"] == 2
    for saved in saved_files:
        expected, actual = load_file(reference / saved), load_file(interrupted / saved)
        assert expected.keys() == actual.keys(), saved
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (saved, key)
    reference_summary = json.loads((reference / "run_summary.json").read_text())
    assert summary["training"]["train_loss"] == pytest.approx(reference_summary["training"]["train_loss"], rel=1e-6)


def test_a_bad_mode_is_named_with_the_allowed_values_before_anything_is_loaded(tmp_path):
    allowed = re.escape("'dynamic_lora', 'resonant', 'resonant+dynamic_lora', 'full'")
    with pytest.raises(ArgumentError, match=rf"^--train: invalid choice: 'resonnant' \(choose from {allowed}\)$"):
        parse_recipe(sft.ARGUMENT_TYPES, SFT_RECIPE, ["--base_model", "x", "--train", "resonnant"])
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train: lora\n")
    with pytest.raises(ArgumentError,
                       match=rf"bad.yaml: field 'train': invalid choice: 'lora' \(choose from {allowed}\)"):
        parse_recipe(sft.ARGUMENT_TYPES, str(recipe), [])
    with pytest.raises(ArgumentError, match=r"train must be one of \['dynamic_lora', 'resonant', "
                                            r"'resonant\+dynamic_lora', 'full'\], got 'lora'"):
        SftArguments(train="lora")


@pytest.mark.parametrize("mode", ["resonant", "resonant+dynamic_lora"])
def test_resonant_modes_need_a_resollm_with_resonant_components(bases, tmp_path, mode):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"--train {re.escape(mode)} trains the resonant components of a ResoLLM, "
                                         rf"but base_model '.*llama' is a 'llama' model; convert it first "
                                         rf"\(reso-hf convert .*llama OUT --kuramoto"):
        sft.run(*sft_arguments(bases["llama"], output_dir, "--train", mode), quiet=True)
    assert not output_dir.exists()  # refused from its config, before the output folder or the weights
    with pytest.raises(ValueError, match=rf"--train {re.escape(mode)}: base_model '.*switches_off' is a ResoLLM "
                                         r"with no resonant component switched on"):
        sft.run(*sft_arguments(bases["switches_off"], output_dir, "--train", mode), quiet=True)


def test_the_mode_is_part_of_the_run_fingerprint():
    def fingerprint(mode):
        sft_args, data_args, training_args = parse_recipe(
            sft.ARGUMENT_TYPES, SFT_RECIPE, ["--base_model", "x", "--train", mode, "--use_bundled_sample", "true"])
        return run_fingerprint("sft", (sft_args, data_args, training_args), data_args)

    assert fingerprint_differences(fingerprint("dynamic_lora"), fingerprint("resonant")) == [
        "train: 'dynamic_lora' -> 'resonant'"]


def test_converted_gates_get_a_gradient():
    """A converted gate starts at exactly 1 but not saturated, so `--train resonant` can move it (an earlier
    saturated start, score bias 40, had a gradient of exactly 0)."""
    model = reso_hf.ResoLLMForCausalLM.from_llama(tiny_llama(), coherence_gating=True).train()
    ids = PROBE_IDS.repeat(2, 1)
    model(ids, labels=ids).loss.backward()
    gate_gradients = [p.grad for name, p in model.named_parameters() if ".coherence_gate." in name]
    assert any(gradient.abs().sum() > 0 for gradient in gate_gradients)


def test_resonant_learning_rate_gives_the_resonant_parameters_their_own_group_and_rate(bases, trainers, tmp_path):
    sft.run(*sft_arguments(bases["resonant"], tmp_path / "out", "--train", "resonant+dynamic_lora",
                           "--resonant_learning_rate", "1e-5", "--lr_scheduler_type", "constant"), quiet=True)
    (trainer,) = trainers
    names = {id(parameter): name for name, parameter in trainer.model.named_parameters()}
    rates = {names[id(p)]: group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    resonant = {name for name in rates if ".modules_to_save.default." in name}
    assert resonant and all(rates[name] == 1e-5 for name in resonant)
    assert {rates[name] for name in rates if name not in resonant} == {1e-2}
    # Adam moves a parameter by at most about lr per step: 3 steps at 1e-5 stay far below one step at 1e-2
    moved = max(float((trainer.model.get_parameter(name).detach() - trainer.initial_parameters[name]).abs().max())
                for name in resonant)
    assert 0 < moved <= 3 * 1e-5 * 1.01


@pytest.mark.parametrize("flags, message", [
    (["--train", "dynamic_lora", "--resonant_learning_rate", "1e-4"],
     r"resonant_learning_rate applies to --train resonant or resonant\+dynamic_lora, got --train dynamic_lora"),
    (["--train", "resonant", "--resonant_learning_rate", "-1"],
     r"resonant_learning_rate must be a finite number > 0, got -1.0")])
def test_a_bad_resonant_learning_rate_is_refused_by_name(flags, message):
    with pytest.raises(ArgumentError, match=message):
        parse_recipe(sft.ARGUMENT_TYPES, SFT_RECIPE, ["--base_model", "x", *flags])
