"""What a person sees on the console: a short DynamicLoRA summary per training log line, one warnings line per
chat answer."""

import io

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import reso_hf
from reso_hf.dynamic_lora.callback import flatten_metrics
from reso_hf.runtime import ResoLLMInference
from reso_hf.runtime.chat import ChatSession, summarize_warnings
from reso_hf.training.trainer import (
    AtomicCheckpointTrainer,
    ConsolePrinterCallback,
    ConsoleProgressCallback,
    console_logs,
)

TIERS = ("foundation", "domain", "swarm", "agent", "context")


def dynamic_lora_logs():
    tier_metrics = {"base_inertia": 0.9, "threshold": 0.7, "grad_norm_ema": 0.1, "density": 1.0, "alpha_eff": 0.9,
                    "vertical": 0.0, "vertical_ema": 0.0, "damping": 1.0, "horizontal_alignment": 0.0,
                    "horizontal_weight": 1.0, "grad_norm_seen": 1.0}
    metrics = {"step": 4, "migrations_this_step": 2, "health": "ACCEPTABLE", "queue_depth": 0, "average_wait": 0.0,
               "conflict_rate": 0.0, "truncation_error": 0.0, "healthy_fraction": 0.5,
               "tiers": {tier: {**tier_metrics, "screened_fraction": 0.1 * (i + 1)} for i, tier in enumerate(TIERS)}}
    return {"loss": 5.5, "grad_norm": 0.4, "learning_rate": 2e-4, "epoch": 0.08, **flatten_metrics(metrics)}


def test_console_line_summarises_the_dynamic_lora_metrics():
    logs = dynamic_lora_logs()
    assert len([key for key in logs if key.startswith("dynamic_lora/")]) > 60
    assert console_logs(logs) == {"loss": 5.5, "grad_norm": 0.4, "learning_rate": 2e-4, "epoch": 0.08,
                                  "dynamic_lora": "ACCEPTABLE, 2 migrations, 30% screened (mean of 5 tiers)"}
    assert len(logs) > 60  # the entry itself (log_history, report_to) keeps every key
    plain = {"loss": 1.0, "epoch": 0.5}
    assert console_logs(plain) == plain


def test_trainer_prints_through_the_concise_callbacks(tmp_path, capsys):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    for disable_tqdm, expected, default in ((False, ConsoleProgressCallback, PrinterCallback),
                                            (True, ConsolePrinterCallback, ProgressCallback)):
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=disable_tqdm)
        trainer = AtomicCheckpointTrainer(model=model, args=args)
        kinds = [type(callback) for callback in trainer.callback_handler.callbacks]
        assert expected in kinds and default not in kinds
        assert ProgressCallback not in kinds and PrinterCallback not in kinds  # only the concise subclasses
    trainer.callback_handler.on_log(trainer.args, trainer.state, trainer.control, logs=dynamic_lora_logs())
    printed = capsys.readouterr().out
    assert "dynamic_lora/" not in printed and "'dynamic_lora': 'ACCEPTABLE, 2 migrations" in printed
    assert len(printed) < 200


def test_chat_warnings_are_one_line_per_answer():
    warnings = ([{"step": s, "type": "predicted_divergent", "message": f"step {s}: ..."} for s in range(3, 12)]
                + [{"step": s, "type": "entered_collapsed", "message": f"step {s}: ..."} for s in (2, 9, 14, 20, 31, 40)]
                + [{"step": 50, "type": "stopped_divergent", "message": "step 50: ..."}])
    assert summarize_warnings(warnings) == ("warnings: predicted divergent x9; entered collapsed x6 (steps 2, 9, 14, 20, "
                                            "31, ...); stopped divergent x1 (step 50)")


def test_chat_keeps_answers_inside_the_context_instead_of_warning_on_each():
    torch.manual_seed(0)
    tokenizer = reso_hf.create_default_tokenizer()
    config = reso_hf.tiny_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, prime_code_dim=8,
                                 max_position_embeddings=64)
    engine = ResoLLMInference(reso_hf.ResoLLMForCausalLM(config).eval(), tokenizer, do_sample=False)
    out = io.StringIO()
    ChatSession(engine, max_new_tokens=128, input_stream=io.StringIO("hi\nhello\nexit\n"), output_stream=out).run()
    lines = out.getvalue().splitlines()
    assert lines[1] == ("max_new_tokens 128 -> 32: the model's context is 64 tokens, and half of it is kept for the "
                        "conversation")
    assert "max_length reduced" not in out.getvalue()
    answers = [i for i, line in enumerate(lines) if line.startswith("Assistant: ")]
    assert len(answers) == 2
    for index in answers:  # the answer, its metrics line, at most one warnings line
        following = lines[index + 1: index + 3]
        assert following[0].startswith("[metrics] ")
        assert following[1].startswith(("  warnings: ", "Assistant: ", "bye"))
