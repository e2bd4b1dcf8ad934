"""ResoLLM inside the ecosystem: pipeline (plain and chat), Trainer."""

import pytest
import torch
from reso_test_models import micro_config
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, pipeline

import reso_hf


@pytest.fixture(scope="module")
def tokenizer():
    return reso_hf.create_default_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return reso_hf.ResoLLMForCausalLM(micro_config(vocab_size=len(tokenizer))).eval()


def test_text_generation_pipeline_greedy_matches_generate(model, tokenizer):
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    result = generator("Once upon a time", max_new_tokens=6, do_sample=False)
    ids = tokenizer("Once upon a time", return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert result[0]["generated_text"] == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert result[0]["generated_text"].startswith("Once upon a time")


def test_text_generation_pipeline_with_chat_messages_uses_the_guanaco_template(model, tokenizer):
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    messages = [{"role": "user", "content": "What is a prime?"}]
    result = generator(messages, max_new_tokens=5, do_sample=False)
    conversation = result[0]["generated_text"]
    assert conversation[0] == messages[0] and conversation[-1]["role"] == "assistant"
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "### Human: What is a prime?### Assistant:"
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    expected = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert conversation[-1]["content"] == reply


def test_left_padded_batch_through_the_pipeline(model, tokenizer):
    tokenizer_left = reso_hf.create_default_tokenizer()
    tokenizer_left.padding_side = "left"
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer_left)
    prompts = ["Hi", "A much longer prompt here"]
    batched = generator(prompts, max_new_tokens=5, do_sample=False, batch_size=2)
    alone = [generator(p, max_new_tokens=5, do_sample=False)[0]["generated_text"] for p in prompts]
    assert [b[0]["generated_text"] for b in batched] == alone


def test_trainer_reduces_the_loss(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = reso_hf.ResoLLMForCausalLM(micro_config(vocab_size=len(tokenizer)))
    texts = ["### Human: What is two plus two?### Assistant: Four.<|eos|>"] * 32
    dataset = Dataset.from_dict({"text": texts}).map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40, learning_rate=5e-3, lr_scheduler_type="constant",
        logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses
    gates = [p for n, p in model.named_parameters() if "coherence_gate" in n]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in gates)
