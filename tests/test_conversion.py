"""Converting a Llama-family model into a ResoLLM (issue 13): the weights carry over and every switched-on
component starts as a no-op, so the converted model computes the source's function."""

import json

import pytest
import torch
from isolation import run_without_reso_hf
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import reso_hf
from reso_hf.conversion import convert_and_save, resonant_parameter_names

DIMS = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
IDENTITY_SWITCHES = {
    "off": {},
    "prime_embedding": {"prime_embedding": True},
    "kuramoto": {"kuramoto": True},
    "coherence_gating": {"coherence_gating": True},
    "all": {"prime_embedding": True, "kuramoto": True, "coherence_gating": True},
}
PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44], [9] * 6]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(**DIMS, rope_parameters={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                                  "rope_theta": 100000.0})
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("name", IDENTITY_SWITCHES)
def test_converted_model_computes_the_source_function_at_any_position(llama, name):
    model = reso_hf.ResoLLMForCausalLM.from_llama(llama, **IDENTITY_SWITCHES[name])
    assert model.config.kuramoto_keeps_position and model.config.coherence_gate_normalized
    ids = torch.randint(3, 97, (2, 60))  # past original_max_position_embeddings: the llama3 scaling acts
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, llama(ids).logits, atol=1e-5)
    for prompt in PROMPTS:
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(torch.tensor([prompt]), **kwargs), llama.generate(torch.tensor([prompt]), **kwargs))


def test_identity_components_are_exact_no_ops_and_train():
    torch.manual_seed(1)
    source = LlamaForCausalLM(LlamaConfig(**DIMS)).eval()
    model = reso_hf.ResoLLMForCausalLM.from_llama(source, **IDENTITY_SWITCHES["all"])
    gate = model.model.layers[0].coherence_gate
    _, gate_values = gate(torch.randn(2, 5, 64) * 10)
    assert torch.equal(gate_values, torch.ones(2, 5))  # exactly 1, not 0.99
    assert sorted({name.split(".")[-2] for name in resonant_parameter_names(model)}) == [
        "kuramoto", "phase_proj", "proj", "score"]
    model.train()
    ids = torch.randint(3, 97, (2, 12))
    model(ids, labels=ids).loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters() if name in resonant_parameter_names(model)}
    assert all(grad is not None for grad in grads.values())
    assert any(grad.abs().sum() > 0 for name, grad in grads.items() if "phase_proj" in name)
    assert all(grad.abs().sum() > 0 for name, grad in grads.items() if "coherence_gate.score" in name)


def test_golden_spectrum_warns_that_positions_are_relearnt(llama):
    with pytest.warns(UserWarning, match="positions are re-learnt"):
        model = reso_hf.ResoLLMForCausalLM.from_llama(llama, rope_spectrum="golden")
    ids = torch.randint(3, 97, (1, 20))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, llama(ids).logits, atol=1e-3)


def test_unsupported_sources_are_named():
    mistral = MistralForCausalLM(MistralConfig(**DIMS, sliding_window=16))
    with pytest.raises(ValueError, match="sliding_window=16 attention has no ResoLLM equivalent"):
        reso_hf.ResoLLMForCausalLM.from_llama(mistral)
    no_window = MistralForCausalLM(MistralConfig(**DIMS, sliding_window=None)).eval()
    converted = reso_hf.ResoLLMForCausalLM.from_llama(no_window)
    ids = torch.randint(3, 97, (1, 10))
    with torch.no_grad():
        assert torch.allclose(converted(ids).logits, no_window(ids).logits, atol=1e-5)
    reso = reso_hf.ResoLLMForCausalLM(reso_hf.tiny_config(vocab_size=97))
    with pytest.raises(ValueError, match=r"cannot convert a 'reso_llm' model: supported architectures are \('llama'"):
        reso_hf.ResoLLMForCausalLM.from_llama(reso)
    with pytest.raises(ValueError, match=r"unknown switches \['gating'\]"):
        reso_hf.ResoLLMForCausalLM.from_llama(no_window, gating=True)


def test_converted_folder_records_the_source_and_loads_without_reso_hf(llama, tmp_path):
    source = tmp_path / "source"
    llama.save_pretrained(source)
    tokenizer = reso_hf.create_default_tokenizer()  # any tokenizer: it is carried over as it is
    tokenizer.save_pretrained(source)
    model = convert_and_save(str(source), str(tmp_path / "converted"), **IDENTITY_SWITCHES["all"])
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["source_model"] == str(source) and config["kuramoto"] is True
    assert (tmp_path / "converted" / "tokenizer.json").is_file()
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        expected = llama(ids).logits
    assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    output = run_without_reso_hf(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "converted")!r}, trust_remote_code=True)
        with torch.no_grad():
            print(model(torch.tensor({ids.tolist()})).logits.flatten().tolist())
        """,
        tmp_path,
    )
    assert torch.allclose(torch.tensor(json.loads(output.strip().splitlines()[-1])), expected.flatten(), atol=1e-5)


def test_reso_hf_convert_writes_the_folder_and_refuses_a_non_empty_one(llama, tmp_path, capsys):
    from reso_hf_cli import main

    source = tmp_path / "source"
    llama.save_pretrained(source)
    reso_hf.create_default_tokenizer().save_pretrained(source)
    assert main(["convert", str(source), str(tmp_path / "out"), "--kuramoto", "--coherence_gating"]) == 0
    printed = capsys.readouterr().out
    assert "added by kuramoto, coherence_gating (all at identity" in printed
    converted = reso_hf.ResoLLMForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert converted.config.kuramoto and converted.config.coherence_gating and not converted.config.prime_embedding
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.allclose(converted(ids).logits, llama(ids).logits, atol=1e-5)
    assert main(["convert", str(source), str(tmp_path / "out")]) == 2
    assert "reso-hf convert: error: output_dir" in capsys.readouterr().err
