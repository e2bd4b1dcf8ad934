"""`make demo`'s tour (reso_hf/tour.py) end to end, on a tiny llama GGUF written here instead of SmolLM2."""

import json

import torch
from tiny_gguf import tiny_llama, write_llama_gguf

import reso_hf
from reso_hf import tour


def test_tour_converts_answers_fine_tunes_reloads_and_writes_the_card(tmp_path, capsys):
    tokenizer = reso_hf.create_default_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    gguf = tmp_path / "tiny-llama.F32.gguf"
    write_llama_gguf(gguf, tiny_llama(len(tokenizer)), tokenizer)
    torch.set_num_threads(1)
    tour.main(tour.TourArguments(gguf=str(gguf), output_dir=str(tmp_path / "tour"), sft_steps=2, max_new_tokens=4))

    printed = capsys.readouterr().out
    for step in range(1, 6):
        assert f"[{step}/5]" in printed
    assert printed.count("ResoGenerateOutput: stability") == 4  # two answers before, two after the SFT
    converted = tmp_path / "tour" / "smollm2-reso"
    config = json.loads((converted / "config.json").read_text())
    assert config["kuramoto"] and config["coherence_gating"] and config["prime_embedding"]
    assert config["source_model"] == str(gguf)
    card = (converted / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    summary = json.loads((tmp_path / "tour" / "sft" / "run_summary.json").read_text())
    assert summary["model"]["train"] == "resonant+dynamic_lora" and summary["training"]["global_step"] == 2
    assert (tmp_path / "tour" / "sft" / "adapter" / "adapter_config.json").is_file()
