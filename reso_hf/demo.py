"""`make demo`: the product tour on the bundled guanaco-format sample, offline, a few minutes on 2 CPU cores.

    1. pretrain a tiny ResoLLM with `reso_hf.training.pretrain` (Trainer, packing, eval, checkpoints)
    2. evaluate it with `reso_hf.training.evaluate` (local `evaluate` perplexity module -> eval_results.json)
    3. reload the Hub-ready folder with `AutoModelForCausalLM` and generate with ResoLLM telemetry
    4. DynamicLoRA SFT of that model with `reso_hf.training.sft` (health report and dynamics plot)

    python -m reso_hf.demo --output_dir outputs/demo [--max_steps 200 --sft_steps 20]
"""

import json
import os
from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

from reso_hf.training import evaluate, pretrain, sft
from reso_hf.training.arguments import DataArguments, EvalArguments, PretrainArguments, SftArguments


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where checkpoints, plots and summaries go."})
    max_steps: int = field(default=200, metadata={"help": "Pretraining optimizer steps."})
    sft_steps: int = field(default=20, metadata={"help": "DynamicLoRA SFT optimizer steps."})
    block_size: int = field(default=256, metadata={"help": "Tokens per packed training block."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per optimizer step."})
    seed: int = field(default=0, metadata={"help": "Random seed."})


def sample_data(block_size: int, assistant_only: bool) -> DataArguments:
    return DataArguments(use_bundled_sample=True, block_size=block_size, assistant_only_loss=assistant_only,
                         chat_template="guanaco", eval_fraction=0.1)


def trainer_arguments(output_dir: str, steps: int, args: DemoArguments, learning_rate: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=learning_rate, lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20), weight_decay=0.01, logging_steps=max(1, steps // 10),
        eval_strategy="steps", eval_steps=max(1, steps // 2), save_strategy="steps", save_steps=max(1, steps // 2),
        save_total_limit=1, report_to="none", use_cpu=True, seed=args.seed, disable_tqdm=True,
    )


def main(args: DemoArguments) -> None:
    pretrain_dir = os.path.join(args.output_dir, "pretrain")
    print(f"[1/4] Pretraining a tiny ResoLLM for {args.max_steps} steps on the bundled guanaco-format sample")
    # the demo owns its folders: every run replaces the previous one (--overwrite_output_dir)
    summary = pretrain.run(PretrainArguments(model_preset="tiny", overwrite_output_dir=True),
                           sample_data(args.block_size, False),
                           trainer_arguments(pretrain_dir, args.max_steps, args, 3e-3), quiet=True)
    model_dir = summary["artifacts"]["model_dir"]
    print(f"      {summary['model']['parameters'] / 1e6:.2f}M parameters, train loss "
          f"{summary['training']['train_loss']:.3f}, eval loss {summary['eval']['eval_loss']:.3f}; "
          f"{summary['data']['malformed_rows']['train']} malformed rows skipped")
    print(f"      loss curves: {summary['artifacts']['loss_plot']}, summary: {pretrain_dir}/run_summary.json")

    print("[2/4] Evaluating the held-out split (local `evaluate` perplexity module)")
    results = evaluate.run(EvalArguments(model=model_dir, num_samples=2, max_new_tokens=40),
                           sample_data(args.block_size, False))
    print(f"      held-out loss {results['loss']:.3f}, perplexity {results['perplexity']:.2f} "
          f"over {results['tokens']} tokens -> {model_dir}/eval_results.json")

    print(f"[3/4] Hub-ready folder {model_dir}: {sorted(os.listdir(model_dir))}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    messages = [{"role": "user", "content": "What is photosynthesis?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=60, do_sample=False, return_dict_in_generate=True,
                            eos_token_id=tokenizer.eos_token_id)
    reply = tokenizer.decode(output.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"      reloaded with AutoModelForCausalLM; greedy reply:\n      ### Human: {messages[0]['content']}\n"
          f"      ### Assistant:{reply}")
    print(f"      telemetry ({type(output).__name__}): stability {output.stability[0]}, "
          f"lyapunov {output.lyapunov[0]:.4f}, {output.tokens_generated[0]} tokens in "
          f"{output.generation_time_ms[0]:.0f} ms")

    sft_dir = os.path.join(args.output_dir, "sft")
    print(f"[4/4] DynamicLoRA SFT of that model for {args.sft_steps} steps (assistant tokens only)")
    tiers = {"target_modules": ["q_proj", "v_proj", "o_proj"], "autocorr_window": 5,
             "tier_ranks": {"foundation": 8, "domain": 8, "swarm": 4, "agent": 4, "context": 2}}
    sft_summary = sft.run(SftArguments(base_model=model_dir, dynamic_lora=json.dumps(tiers), overwrite_output_dir=True),
                          sample_data(args.block_size, True),
                          trainer_arguments(sft_dir, args.sft_steps, args, 1e-3), quiet=True)
    health = sft_summary["dynamic_lora"]["health"]
    print(f"      trainable {sft_summary['model']['trainable_parameters']:,} of "
          f"{sft_summary['model']['parameters']:,} parameters; eval loss {sft_summary['eval']['eval_loss']:.3f}")
    print(f"      health: {health['health']} {health.get('health_reasons') or ''}")
    for tier, values in health["tiers"].items():
        print(f"        {tier:<10} alpha_eff {values.get('alpha_eff', float('nan')):.3f}  "
              f"screened {values.get('screened_fraction', float('nan')):.2f}")
    print(f"      adapter: {sft_summary['artifacts']['model_dir']}; dynamics plot: {sft_dir}/{sft.DYNAMICS_PLOT_NAME}")


if __name__ == "__main__":
    (demo_args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses()
    main(demo_args)
