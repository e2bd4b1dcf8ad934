"""Does goal conditioning move generations toward the goal? Does memory recall find planted facts?

1. Goal conditioning: a tiny ResoLLM with agency on is trained briefly on the bundled guanaco-format
   sample (assistant-only loss; goal dropout feeds the answer's own mean hidden state as the goal
   slot for `goal_dropout` of the rows). On held-out rows, the answer text is set as the goal and
   we generate with and without it; the score is cosine(mean hidden state of the generation,
   goal vector), as in SPEC §3.6 goal progress. Also reported: the same for an untrained model.
2. Memory: N facts are stored with `update_memory` at different ages; each is queried with its own
   question; recall@k = share of queries whose fact is among the top-k (cosine x strength), per age
   bucket, with decay on and off.

    python benchmarks/goal_conditioning.py [--steps 200] [--facts 12]
"""

import argparse
import json
import os
import random
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

import reso_hf
from reso_hf.training.data import bundled_sample_path

RESULTS = Path(__file__).parent / "results"


def split_turn(text: str) -> tuple[str, str]:
    human, answer = text.split("### Assistant:", 1)
    return human.replace("### Human:", "").strip(), answer.split("### Human:")[0].strip()


def build(tokenizer, seed: int, goal_dropout: float):
    torch.manual_seed(seed)
    config = reso_hf.tiny_config(vocab_size=len(tokenizer), max_position_embeddings=512,
                                 agency={"enabled": True, "goal_dropout": goal_dropout},
                                 temporal_smf={"enabled": True, "memory_decay_rate": 0.05, "max_moments": 100})
    model = reso_hf.ResoLLMForCausalLM(config)
    model.attach_tokenizer(tokenizer)
    return model


def encode_row(tokenizer, question: str, answer: str, max_length: int):
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids = torch.tensor(encoded["input_ids"][:max_length])
    labels = ids.clone()
    labels[torch.tensor(encoded["assistant_masks"][:max_length]) == 0] = -100
    return ids, labels


def train(model, rows, tokenizer, steps: int, batch_size: int, seed: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = random.Random(seed)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="SFT with goal dropout"):
        batch = [encode_row(tokenizer, *generator.choice(rows), 256) for _ in range(batch_size)]
        length = max(len(ids) for ids, _ in batch)
        ids = torch.full((batch_size, length), tokenizer.pad_token_id)
        labels = torch.full((batch_size, length), -100)
        mask = torch.zeros((batch_size, length), dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(batch):
            ids[i, : len(row_ids)], labels[i, : len(row_ids)], mask[i, : len(row_ids)] = row_ids, row_labels, 1
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def goal_alignment(model, tokenizer, rows, new_tokens: int) -> dict:
    scores = {"with_goal": [], "without_goal": []}
    for question, answer in tqdm(rows, desc="goal conditioning"):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        goal_vector = model.text_vector(answer)
        for condition in scores:
            model.reset_state()
            if condition == "with_goal":
                model.create_goal(answer)
            output = model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
            generated = output[0, prompt["input_ids"].shape[1]:]
            model.reset_state()  # measure the text alone, without the goal slot
            hidden = model.model(input_ids=generated[None], use_cache=False).last_hidden_state[0].float().mean(0)
            scores[condition].append(float(torch.cosine_similarity(hidden, goal_vector, dim=0)))
    return {k: statistics.mean(v) for k, v in scores.items()} | {"rows": len(rows)}


@torch.no_grad()
def memory_recall(model, rows, facts: int, decay: float) -> dict:
    model.reset_state()
    store = model.reso_state.memory
    store.decay_rate = decay
    planted = rows[:facts]
    entries = []
    for question, answer in planted:  # one fact every 10 model steps: the first is the oldest
        entries.append(model.update_memory(answer, importance=1.0))
        store.advance(10)
    hits = {1: [], 3: []}
    for entry, (question, _) in zip(entries, planted):
        recalled = [e for e, _ in model.recall(question, k=3)]
        hits[1].append(entry in recalled[:1])
        hits[3].append(entry in recalled)
    half = len(planted) // 2
    return {
        "decay_rate": decay,
        "recall@1": statistics.mean(hits[1]), "recall@3": statistics.mean(hits[3]),
        "recall@3_oldest_half": statistics.mean(hits[3][:half]),
        "recall@3_newest_half": statistics.mean(hits[3][half:]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_rows", type=int, default=16)
    parser.add_argument("--facts", type=int, default=12)
    parser.add_argument("--new_tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS / "goal_conditioning.json"))
    args = parser.parse_args()

    tokenizer = reso_hf.create_default_tokenizer()
    with open(bundled_sample_path(), encoding="utf-8") as handle:
        rows = [split_turn(json.loads(line)["text"]) for line in handle if line.strip()]
    random.Random(args.seed).shuffle(rows)
    held_out, train_rows = rows[: args.eval_rows], rows[args.eval_rows :]

    untrained = build(tokenizer, args.seed, goal_dropout=0.5).eval()
    results = {"untrained": goal_alignment(untrained, tokenizer, held_out, args.new_tokens)}
    trained = build(tokenizer, args.seed, goal_dropout=0.5)
    losses = train(trained, train_rows, tokenizer, args.steps, args.batch_size, args.seed)
    results["trained"] = goal_alignment(trained, tokenizer, held_out, args.new_tokens)
    results["memory"] = [memory_recall(trained, rows, args.facts, decay) for decay in (0.0, 0.05)]
    results["sft_loss_first_last"] = [losses[0], losses[-1]]

    lines = ["| model | cosine(generation, goal) with goal | without goal | difference |", "|---|---|---|---|"]
    for name in ("untrained", "trained"):
        r = results[name]
        lines.append(f"| {name} | {r['with_goal']:.3f} | {r['without_goal']:.3f} | "
                     f"{r['with_goal'] - r['without_goal']:+.3f} |")
    lines += ["", "| memory decay | recall@1 | recall@3 | recall@3 oldest half | recall@3 newest half |",
              "|---|---|---|---|---|"]
    for r in results["memory"]:
        lines.append(f"| {r['decay_rate']} | {r['recall@1']:.2f} | {r['recall@3']:.2f} | "
                     f"{r['recall@3_oldest_half']:.2f} | {r['recall@3_newest_half']:.2f} |")
    table = "\n".join(lines)
    print(table)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"settings": vars(args), "results": results, "table_markdown": table}, indent=2))
    os.replace(temporary, output)
    plot(results, losses, output.with_suffix(".png"))
    print(f"wrote {output} and {output.with_suffix('.png')}")


def plot(results, losses, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(losses)
    axes[0].set(title="SFT loss (goal dropout 0.5)", xlabel="step", ylabel="loss")
    names = ["untrained", "trained"]
    width = 0.35
    for offset, condition in ((-width / 2, "with_goal"), (width / 2, "without_goal")):
        axes[1].bar([i + offset for i in range(2)], [results[n][condition] for n in names], width, label=condition)
    axes[1].set_xticks(range(2), names)
    axes[1].set(title="cosine(generation, goal)")
    axes[1].legend()
    memory = results["memory"]
    labels = ["recall@1", "recall@3", "recall@3_oldest_half", "recall@3_newest_half"]
    for offset, r in zip((-width / 2, width / 2), memory):
        axes[2].bar([i + offset for i in range(len(labels))], [r[k] for k in labels], width,
                    label=f"decay {r['decay_rate']}")
    axes[2].set_xticks(range(len(labels)), [k.replace("_", "\n") for k in labels], fontsize=8)
    axes[2].set(title="memory recall of planted facts", ylim=(0, 1.05))
    axes[2].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
