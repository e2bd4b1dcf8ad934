"""Shared helpers of the generation benchmarks (stochastic_resonance.py, stability_monitor.py,
generation_overhead.py): atomic result files, repetition metrics and a briefly trained tiny ResoLLM."""

import json
import os
import tempfile
import time
from pathlib import Path

import torch

import reso_hf

RESULTS = Path(__file__).parent / "results"
SAMPLE = Path(reso_hf.__file__).parent / "data" / "guanaco_sample.jsonl"
CACHE = Path(tempfile.gettempdir()) / "reso_hf_bench_brief_model"


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def save_figure(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def distinct_n(tokens: list[int], n: int = 2) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repetition_rate(tokens: list[int], n: int = 4) -> float:
    """Fraction of n-grams of the generation that already occurred earlier in it."""
    seen, repeated, total = set(), 0, 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        repeated += gram in seen
        total += 1
        seen.add(gram)
    return repeated / total if total else 0.0


def sample_texts() -> list[str]:
    with open(SAMPLE, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def human_prompts(limit: int) -> list[str]:
    """The human turns of the bundled sample as chat prompts ending in '### Assistant:'."""
    prompts = []
    for text in sample_texts():
        human = text.split("### Assistant:")[0]
        prompts.append(human + "### Assistant:")
    return prompts[:limit]


def brief_model(steps: int = 300, block: int = 128, batch: int = 8, log=print):
    """A tiny ResoLLM (hidden 128, 4 layers, byte tokenizer) trained `steps` AdamW steps on the bundled
    guanaco sample; cached (safetensors) in the temp folder so the benchmarks share it."""
    tokenizer = reso_hf.create_default_tokenizer()
    marker = CACHE / f"trained_{steps}_{block}_{batch}.json"
    if marker.exists():
        return reso_hf.ResoLLMForCausalLM.from_pretrained(CACHE).eval(), tokenizer, json.loads(marker.read_text())
    torch.manual_seed(0)
    config = reso_hf.tiny_config(vocab_size=len(tokenizer), max_position_embeddings=512)
    model = reso_hf.ResoLLMForCausalLM(config)
    ids = []
    for text in sample_texts():
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(steps):
        rows = data[torch.randint(0, data.shape[0], (batch,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
        if step % 50 == 0 or step == steps - 1:
            log(f"  train step {step}: loss {loss.item():.3f}")
    info = {"steps": steps, "block": block, "batch": batch, "tokens": int(data.numel()),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]), "train_seconds": time.perf_counter() - start,
            "config": "tiny_config(vocab_size=259, max_position_embeddings=512)"}
    model.eval()
    model.save_pretrained(CACHE)
    write_json(marker, info)
    return model, tokenizer, info
