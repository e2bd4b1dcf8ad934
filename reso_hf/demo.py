"""`make demo`: train a tiny ResoLLM on the bundled guanaco-format sample, save it as a Hub-ready
folder, reload it through `AutoModelForCausalLM` and chat with it.

    python -m reso_hf.demo --output_dir outputs/demo [--max_steps 300]
"""

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

import reso_hf


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the checkpoint and logs go."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps (about 2 minutes on 2 CPU cores)."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per optimizer step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate."})
    seed: int = field(default=0, metadata={"help": "Random seed."})


def bundled_sample_texts() -> list[str]:
    """The guanaco-format conversations shipped with the package (written for the project)."""
    with resources.files("reso_hf").joinpath("data/guanaco_sample.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def packed_blocks(texts: list[str], tokenizer, block_size: int) -> Dataset:
    """Concatenate the documents with EOS between them and cut into equal blocks (labels = inputs)."""
    stream = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    usable = len(stream) // block_size * block_size
    blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def main(args: DemoArguments) -> None:
    output_dir = Path(args.output_dir)
    checkpoint = output_dir / "model"
    tokenizer = reso_hf.create_default_tokenizer()
    config = reso_hf.tiny_config(vocab_size=len(tokenizer), max_position_embeddings=args.block_size)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    dataset = packed_blocks(bundled_sample_texts(), tokenizer, args.block_size)
    print(f"[1/3] Training a {parameters / 1e6:.2f}M-parameter ResoLLM on {len(dataset)} blocks of "
          f"{args.block_size} tokens (bundled guanaco-format sample)")

    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(1, args.max_steps // 20), weight_decay=0.01,
        logging_steps=max(1, args.max_steps // 10), save_strategy="no", report_to=[], use_cpu=True,
        seed=args.seed, dataloader_drop_last=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=default_data_collator)
    started = time.perf_counter()
    result = trainer.train()
    print(f"      final training loss {result.training_loss:.3f} in {time.perf_counter() - started:.0f} s")

    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    print(f"[2/3] Saved a Hub-ready folder to {checkpoint}: {sorted(p.name for p in checkpoint.iterdir())}")

    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    messages = [{"role": "user", "content": "What is photosynthesis?"}]
    inputs = reloaded_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
    output = reloaded.generate(**inputs, max_new_tokens=80, do_sample=False,
                               eos_token_id=reloaded_tokenizer.eos_token_id)
    reply = reloaded_tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print("[3/3] Reloaded with AutoModelForCausalLM and generated (greedy):")
    print(f"      ### Human: {messages[0]['content']}\n      ### Assistant:{reply}")


if __name__ == "__main__":
    (demo_args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses()
    main(demo_args)
