"""Hub-ready checkpoints: Auto classes, files on disk, loading without reso_hf, clear load errors."""

import json

import numpy as np
import pytest
import torch
from reso_test_models import micro_config
from isolation import run_without_reso_hf
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

import reso_hf
from reso_hf.registration import register_reso_llm

PROMPTS = ["Hello, world!", "¿Dónde está la biblioteca? 🌍", "Привет, как дела?", "数学 and 論理\n\ttabs"]


def test_registration_with_auto_classes_is_idempotent():
    register_reso_llm()
    register_reso_llm()
    config = AutoConfig.for_model("reso_llm", vocab_size=50, hidden_size=32, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, num_hidden_layers=1)
    assert isinstance(config, reso_hf.ResoLLMConfig)
    assert type(AutoModelForCausalLM.from_config(config)) is reso_hf.ResoLLMForCausalLM
    assert type(AutoModel.from_config(config)) is reso_hf.ResoLLMModel


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint")
    tokenizer = reso_hf.create_default_tokenizer()
    torch.manual_seed(0)
    model = reso_hf.ResoLLMForCausalLM(micro_config(vocab_size=len(tokenizer)))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root, model, tokenizer


def test_save_pretrained_writes_a_complete_hub_folder(saved_checkpoint):
    root, _, _ = saved_checkpoint
    folder = root / "model"
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "reso_llm"
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    referenced = list(config["auto_map"].values()) + [
        entry for entry in tokenizer_config["auto_map"]["AutoTokenizer"] if entry
    ]
    assert {"AutoConfig", "AutoModelForCausalLM"} <= set(config["auto_map"])
    for reference in referenced:
        module = reference.split(".")[0]
        assert (folder / f"{module}.py").is_file(), reference
    # The copied modules import their relative siblings, which must be there too.
    assert {"resonance.py", "primes.py", "configuration_reso_llm.py"} <= names


def test_reload_with_auto_classes_is_bit_identical(saved_checkpoint):
    root, model, tokenizer = saved_checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(root / "model")
    loaded_tokenizer = AutoTokenizer.from_pretrained(root / "model")
    ids = torch.tensor([tokenizer("A prime example")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for text in PROMPTS:
        assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_loads_with_trust_remote_code_where_reso_hf_is_not_installed(saved_checkpoint):
    root, model, tokenizer = saved_checkpoint
    ids = [tokenizer(text)["input_ids"] for text in PROMPTS]
    expected = []
    for row in ids:
        with torch.no_grad():
            expected.append(model(torch.tensor([row])).logits[0].numpy())
    np.savez(root / "expected.npz", *expected)
    (root / "expected_ids.json").write_text(json.dumps(ids))
    (root / "prompts.json").write_text(json.dumps(PROMPTS))

    output = run_without_reso_hf(
        f"""
        import json, numpy as np, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder = {str(root / "model")!r}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        prompts = json.load(open({str(root / "prompts.json")!r}))
        expected_ids = json.load(open({str(root / "expected_ids.json")!r}))
        expected = np.load({str(root / "expected.npz")!r})
        for i, text in enumerate(prompts):
            ids = tokenizer(text)["input_ids"]
            assert ids == expected_ids[i], (ids, expected_ids[i])
            assert tokenizer.decode(ids) == text
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].numpy()
            assert np.array_equal(logits, expected[f"arr_{{i}}"]), "logits differ"
        generated = model.generate(torch.tensor([expected_ids[0]]), max_new_tokens=5, do_sample=False)
        print(type(model).__module__, type(tokenizer).__name__, generated.shape[1])
        """,
        root,
    )
    module, tokenizer_class, length = output.split()
    assert module.startswith("transformers_modules.") and tokenizer_class == "ResoTokenizer"
    assert int(length) == len(ids[0]) + 5


def test_missing_weights_file_gives_a_clear_error(tmp_path):
    model = reso_hf.ResoLLMForCausalLM(micro_config())
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match="has no weights file model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_truncated_weights_file_gives_a_clear_error(tmp_path):
    model = reso_hf.ResoLLMForCausalLM(micro_config())
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(OSError, match=r"model\.safetensors is truncated or corrupt: expected \d+ bytes"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    weights.write_bytes(data[:5])
    with pytest.raises(OSError, match="too short for a safetensors header"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
