"""ResoLLM vs Llama of identical size on guanaco: held-out loss, per-switch curves, Trainer overhead.

    python benchmarks/quality.py ../shared/data/guanaco/openassistant_best_replies_eval.jsonl [--quick]

Same tokenizer (a byte-level BPE trained on the training rows), same packed data, same steps, seed and
optimizer (Trainer's AdamW, cosine schedule) for every model. A fixed 10% of the rows (seeded permutation)
is held out. Models: Llama (LlamaForCausalLM), ResoLLM with all core switches on, with all off, and with
each switch alone. Then tokens/s of the Trainer loop vs a plain PyTorch loop (same model, batches,
optimizer). Writes benchmarks/results/quality{,_quick}.{json,png}.
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import reso_hf  # noqa: E402
from reso_hf.training.data import pack_documents, parse_guanaco, read_jsonl_texts, tokenize_messages  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SWITCHES_OFF = dict(prime_embedding=False, rope_spectrum="geometric", kuramoto=False, coherence_gating=False)
VARIANTS = {
    "reso_all_on": dict(prime_embedding=True, rope_spectrum="golden", kuramoto=True, coherence_gating=True),
    "reso_all_off": SWITCHES_OFF,
    "reso_prime_embedding_only": {**SWITCHES_OFF, "prime_embedding": True},
    "reso_golden_rope_only": {**SWITCHES_OFF, "rope_spectrum": "golden"},
    "reso_kuramoto_only": {**SWITCHES_OFF, "kuramoto": True},
    "reso_coherence_gating_only": {**SWITCHES_OFF, "coherence_gating": True},
}


def split_rows(path: str, seed: int):
    texts = read_jsonl_texts(path)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held_out = max(1, len(texts) // 10)
    return [texts[i] for i in order[held_out:]], [texts[i] for i in order[:held_out]]


def blocks(texts, tokenizer, block_size) -> Dataset:
    documents = [tokenize_messages(tokenizer, parse_guanaco(t), reso_hf.GUANACO_CHAT_TEMPLATE, False) for t in texts]
    return Dataset.from_dict(pack_documents(documents, block_size, tokenizer.pad_token_id))


def reso_model(switches, tokenizer, preset="small"):
    config = getattr(reso_hf, f"{preset}_config")(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  use_cache=False, **switches)
    return reso_hf.ResoLLMForCausalLM(config)


def llama_model(tokenizer):
    reference = reso_hf.small_config(vocab_size=len(tokenizer))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=reference.hidden_size,
                         intermediate_size=reference.intermediate_size, num_hidden_layers=reference.num_hidden_layers,
                         num_attention_heads=reference.num_attention_heads,
                         num_key_value_heads=reference.num_key_value_heads,
                         max_position_embeddings=reference.max_position_embeddings, rms_norm_eps=reference.rms_norm_eps,
                         tie_word_embeddings=reference.tie_word_embeddings, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=False)
    return LlamaForCausalLM(config)


def training_arguments(args, output_dir, steps) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20), weight_decay=0.1, max_grad_norm=1.0, logging_steps=max(1, steps // 10),
        eval_strategy="steps", eval_steps=max(1, steps // args.eval_points), save_strategy="no", report_to="none",
        use_cpu=args.device == "cpu", seed=args.seed, disable_tqdm=True, dataloader_drop_last=True,
    )


def train_one(name, build, args, train, held_out) -> dict:
    torch.manual_seed(args.seed)
    model = build()
    trainer = Trainer(model=model, args=training_arguments(args, f"/tmp/quality_{name}", args.steps),
                      train_dataset=train, eval_dataset=held_out, data_collator=default_data_collator)
    started = time.perf_counter()
    result = trainer.train()
    final = trainer.evaluate()["eval_loss"]
    curve = [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
    print(f"  {name:<28} held-out loss {final:.4f}  ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"held_out_loss": final, "train_loss": result.training_loss, "eval_curve": curve,
            "parameters": sum(p.numel() for p in model.parameters())}


def plain_loop_tokens_per_second(model, train, args, steps) -> float:
    """The same AdamW update Trainer makes (weight decay on all but biases/norms is Trainer's detail; the cost
    is the same), over the same batches, without Trainer or Accelerate."""
    loader = torch.utils.data.DataLoader(train.with_format("torch"), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, collate_fn=default_data_collator)
    model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1)
    model.train()
    batches = iter(loader)
    step_ends = []
    for _ in range(steps):
        batch = {key: value.to(args.device) for key, value in next(batches).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
    return tokens_per_second(step_ends, args)


def tokens_per_second(step_ends, args) -> float:
    """Steady state: from the end of the first step (warm-up, set-up) to the end of the last."""
    return (len(step_ends) - 1) * args.batch_size * args.block_size / (step_ends[-1] - step_ends[0])


class StepClock(TrainerCallback):
    def __init__(self):
        self.step_ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())


def trainer_tokens_per_second(model, train, args, steps) -> float:
    training = training_arguments(args, "/tmp/quality_speed", steps)
    training.eval_strategy, training.logging_steps = "no", steps
    clock = StepClock()
    trainer = Trainer(model=model, args=training, train_dataset=train, data_collator=default_data_collator,
                      callbacks=[clock])
    trainer.train()
    return tokens_per_second(clock.step_ends, args)


def overhead(args, tokenizer, train) -> dict:
    rows = []
    for attempt in range(args.speed_repeats):  # alternate to share the machine's load fairly
        torch.manual_seed(args.seed)
        plain = plain_loop_tokens_per_second(reso_model(VARIANTS["reso_all_on"], tokenizer), train, args, args.speed_steps)
        torch.manual_seed(args.seed)
        trained = trainer_tokens_per_second(reso_model(VARIANTS["reso_all_on"], tokenizer), train, args, args.speed_steps)
        rows.append({"plain_tokens_per_s": plain, "trainer_tokens_per_s": trained})
    plain = max(r["plain_tokens_per_s"] for r in rows)
    trained = max(r["trainer_tokens_per_s"] for r in rows)
    return {"runs": rows, "plain_tokens_per_s": plain, "trainer_tokens_per_s": trained,
            "overhead": plain / trained, "steps": args.speed_steps}


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, run in result["models"].items():
        steps, losses = zip(*run["eval_curve"])
        curves.plot(steps, losses, marker="o", markersize=3, label=name, linewidth=2.5 if name == "llama" else 1.2)
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("held-out loss (nats/token)")
    curves.set_title("held-out loss during training")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    names = list(result["models"])
    bars.barh(names, [result["models"][n]["held_out_loss"] for n in names])
    bars.set_xlim(min(r["held_out_loss"] for r in result["models"].values()) * 0.97,
                  max(r["held_out_loss"] for r in result["models"].values()) * 1.01)
    bars.set_xlabel("final held-out loss")
    bars.set_title(f"ResoLLM / Llama = {result['ratio_reso_all_on_to_llama']:.3f}")
    figure.tight_layout()
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=110)
    os.replace(temporary, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="guanaco-format jsonl (e.g. ../shared/data/guanaco/openassistant_best_replies_eval.jsonl)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (a couple of minutes)")
    # the default fits ~15 minutes on 2 shared CPU cores; raise --steps/--batch_size where there is compute
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--eval_points", type=int, default=4)
    parser.add_argument("--max_eval_blocks", type=int, default=24)
    parser.add_argument("--speed_steps", type=int, default=12)
    parser.add_argument("--speed_repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.block_size, args.batch_size, args.eval_points = 8, 64, 2, 2
        args.max_eval_blocks, args.speed_steps, args.speed_repeats = 4, 5, 1
    torch.set_num_threads(max(1, torch.get_num_threads()))

    train_texts, held_out_texts = split_rows(args.data, args.seed)
    tokenizer = reso_hf.train_tokenizer(train_texts, args.vocab_size)
    train = blocks(train_texts, tokenizer, args.block_size)
    held_out = blocks(held_out_texts, tokenizer, args.block_size)
    held_out = held_out.select(range(min(len(held_out), args.max_eval_blocks)))
    print(f"{len(train_texts)} train rows -> {len(train)} blocks, {len(held_out_texts)} held-out rows -> "
          f"{len(held_out)} blocks of {args.block_size}; tokenizer {len(tokenizer)} tokens; {args.steps} steps "
          f"x {args.batch_size} blocks", flush=True)

    models = {"llama": train_one("llama", lambda: llama_model(tokenizer), args, train, held_out)}
    for name, switches in VARIANTS.items():
        models[name] = train_one(name, lambda s=switches: reso_model(s, tokenizer), args, train, held_out)
    speed = overhead(args, tokenizer, train)
    print(f"  Trainer {speed['trainer_tokens_per_s']:.0f} tok/s vs plain loop {speed['plain_tokens_per_s']:.0f} "
          f"tok/s: overhead {speed['overhead']:.3f}x", flush=True)

    result = {
        "command": " ".join(sys.argv),
        "settings": {k: v for k, v in vars(args).items()},
        "data": {"train_rows": len(train_texts), "held_out_rows": len(held_out_texts), "train_blocks": len(train),
                 "held_out_blocks": len(held_out), "tokenizer_size": len(tokenizer)},
        "models": models,
        "ratio_reso_all_on_to_llama": models["reso_all_on"]["held_out_loss"] / models["llama"]["held_out_loss"],
        "per_switch_vs_all_off": {name: models[name]["held_out_loss"] - models["reso_all_off"]["held_out_loss"]
                                  for name in VARIANTS if name.endswith("_only")},
        "trainer_overhead": speed,
        "versions": {"torch": torch.__version__, "reso_hf": reso_hf.__version__},
        "threads": torch.get_num_threads(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / ("quality_quick" if args.quick else "quality")
    temporary = stem.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, stem.with_suffix(".json"))
    plot(result, stem.with_suffix(".png"))
    print(f"ResoLLM (all on) / Llama held-out loss = {result['ratio_reso_all_on_to_llama']:.4f}; "
          f"wrote {stem.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
