"""reso_hf.loading: one loader for Hub ids, model folders, .gguf files and PEFT adapter folders, and the
GGUF route of `reso-hf sft` (a tiny llama GGUF written here with the `gguf` package, trained for a few steps)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_gguf import tiny_llama, write_llama_gguf
from transformers import LlamaForCausalLM

import reso_hf
from reso_hf.loading import ModelSource, load_causal_lm, load_tokenizer, resolve_model_source
from reso_hf.training import sft
from reso_hf.training.arguments import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
SFT_RECIPE = str(ROOT / "recipes/dynamic_lora/sft_guanaco.yaml")
SMALL_DYNAMIC_LORA = json.dumps({"target_modules": ["q_proj", "v_proj"],
                                 "tier_ranks": {"foundation": 4, "domain": 4, "swarm": 2, "agent": 2, "context": 2}})


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """(path of a tiny llama GGUF, the Llama it was written from, its tokenizer)."""
    tokenizer = reso_hf.create_default_tokenizer()
    # transformers' byte-level GGUF tokenizer adds "<|endoftext|>" when the file lacks it (as SmolLM2's has it)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    llama = tiny_llama(len(tokenizer))
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_llama_gguf(path, llama, tokenizer)
    return path, llama, tokenizer


def assert_same_weights(actual, expected):
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert sorted(actual_state) == sorted(expected_state)
    for name, tensor in expected_state.items():
        assert torch.equal(actual_state[name], tensor), name


def test_resolve_model_source_accepts_each_kind_and_names_the_field_in_errors(tmp_path, gguf_model):
    path, llama, _ = gguf_model
    assert resolve_model_source("org/model") == ModelSource("org/model")
    assert resolve_model_source(str(path)) == ModelSource(str(path.parent), gguf_file=path.name)
    assert resolve_model_source(str(path.parent), gguf_file=path.name).name == str(path)
    llama.save_pretrained(tmp_path / "llama")
    assert resolve_model_source(str(tmp_path / "llama")) == ModelSource(str(tmp_path / "llama"))

    with pytest.raises(ValueError, match="base_model is required: a Hub id, a model folder"):
        resolve_model_source(None, field="base_model")
    with pytest.raises(FileNotFoundError, match="base_model: GGUF file '.*missing.gguf' does not exist"):
        resolve_model_source(str(tmp_path / "missing.gguf"), field="base_model")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match=r"'.*fake.gguf' is not a GGUF file \(it does not start with the bytes "
                                         r"b'GGUF'\)"):
        resolve_model_source(str(tmp_path / "fake.gguf"))
    with pytest.raises(FileNotFoundError, match=r"--model: folder '.*' holds neither config.json .* nor "
                                                r"adapter_config.json .*; it holds \['tiny-llama.F32.gguf'\]"):
        resolve_model_source(str(path.parent), field="--model")
    with pytest.raises(FileNotFoundError, match=r"model: 'no/such/folder' does not exist, and it is not a Hub id"):
        resolve_model_source("no/such/folder")
    with pytest.raises(ValueError, match=r"'.*config.json' is a file; expected a Hub id, a model folder"):
        resolve_model_source(str(tmp_path / "llama" / "config.json"))
    with pytest.raises(ValueError, match="gguf_file='other.gguf' names another"):
        resolve_model_source(str(path), gguf_file="other.gguf")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match=r"adapter_config.json names no base model "
                                         r"\(base_model_name_or_path is None\)"):
        resolve_model_source(str(tmp_path / "adapter"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/base"}))
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json base_model_name_or_path: '/gone/base' does not"):
        resolve_model_source(str(tmp_path / "adapter"))


def test_a_gguf_without_the_gguf_package_says_which_extra_to_install(monkeypatch, gguf_model):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else find_spec(name, *args))
    with pytest.raises(ImportError, match=r"base_model: reading the GGUF file '.*' needs the gguf package: "
                                          r"pip install 'reso-hf\[gguf\]'"):
        resolve_model_source(str(gguf_model[0]), field="base_model")


def test_a_gguf_loads_as_a_plain_trainable_model_that_saves(tmp_path, gguf_model):
    path, llama, tokenizer = gguf_model
    model = load_causal_lm(str(path), dtype=torch.float32)
    assert isinstance(model, LlamaForCausalLM)
    assert_same_weights(model, llama)  # the file round-trips exactly (float32 tensors)
    # nothing left of transformers' GGUF quantizer: Trainer refused such a model ("does not support training")
    assert model.is_quantized is False and "hf_quantizer" not in vars(model)
    assert not hasattr(model.config, "quantization_config")
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert model.name_or_path == str(path)  # what an adapter trained on it records as its base model
    model.save_pretrained(tmp_path / "saved")
    assert_same_weights(LlamaForCausalLM.from_pretrained(tmp_path / "saved"), llama)

    loaded_tokenizer = load_tokenizer(str(path))
    text = "Hello, world!<|eos|>"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert (loaded_tokenizer.bos_token, loaded_tokenizer.eos_token, loaded_tokenizer.pad_token) == (
        "<|bos|>", "<|eos|>", "<|pad|>")


def sft_arguments(base_model: str, output_dir, *extra: str):
    return parse_recipe(sft.ARGUMENT_TYPES, SFT_RECIPE, [
        "--base_model", base_model, "--use_bundled_sample", "true", "--block_size", "64",
        "--output_dir", str(output_dir), "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--max_train_samples", "20", "--max_eval_samples", "4",
        "--dynamic_lora", SMALL_DYNAMIC_LORA, *extra])


def test_sft_trains_a_dynamic_lora_adapter_on_a_gguf_base_and_the_adapter_reloads(tmp_path, gguf_model):
    path, llama, _ = gguf_model
    summary = sft.run(*sft_arguments(str(path), tmp_path / "out"), quiet=True)
    assert summary["training"]["global_step"] == 3
    assert math.isfinite(summary["training"]["train_loss"]) and summary["training"]["train_loss"] > 0
    adapter_dir = tmp_path / "out" / "adapter"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)
    # B starts at zero (the adapter is a no-op at first): trained factors are not zero
    factors_b = {name: tensor for name, tensor in load_file(adapter_dir / "adapter_model.safetensors").items()
                 if ".dynamic_lora_B." in name}
    assert factors_b and all(tensor.abs().sum() > 0 for tensor in factors_b.values())

    adapted = load_causal_lm(str(adapter_dir))  # the base GGUF named in adapter_config.json, then the adapter
    assert type(adapted).__name__ == "PeftModelForCausalLM"
    state = adapted.state_dict()
    for name, tensor in factors_b.items():
        assert torch.equal(state[name.replace(".dynamic_lora_B.", ".dynamic_lora_B.default.")], tensor), name
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert not torch.allclose(adapted(ids).logits, llama(ids).logits)
        with adapted.disable_adapter():
            assert torch.allclose(adapted(ids).logits, llama(ids).logits)


def test_sft_rejects_a_bad_base_model_before_preparing_any_data(tmp_path, gguf_model):
    arguments = sft_arguments(str(tmp_path / "missing.gguf"), tmp_path / "out", "--use_bundled_sample", "false",
                              "--data_files", str(tmp_path / "no_such_data.jsonl"))
    with pytest.raises(FileNotFoundError, match="base_model: GGUF file '.*missing.gguf' does not exist"):
        sft.run(*arguments, quiet=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(gguf_model[0])}))
    with pytest.raises(ValueError, match=r"base_model '.*adapter' is a PEFT adapter folder; pass the model it adapts "
                                         r"\('.*tiny-llama.F32.gguf'\)"):
        sft.run(*sft_arguments(str(adapter), tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out").exists()
