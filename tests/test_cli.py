"""The `reso-hf` launcher: fast help without torch, short titled command help, one-line user errors (exit 2)."""

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from transformers import TrainingArguments

import reso_hf
import reso_hf_cli
from reso_hf.training import commands as training_commands
from reso_hf.training.arguments import ArgumentError

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, **environment) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **environment)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_top_level_and_recipe_command_help_import_neither_torch_nor_reso_hf():
    # What makes `reso-hf --help` take well under a second: torch alone takes about one.
    result = run_python(
        "import sys, reso_hf_cli\n"
        "for argv in (['--help'], ['train', '--help'], ['sft', '-h'], ['eval', '--help']):\n"
        "    try:\n"
        "        reso_hf_cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(name for name in ('torch', 'transformers', 'datasets', 'reso_hf') if name in sys.modules))\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "usage: reso-hf [-h] [--debug] COMMAND ..." in result.stdout


@pytest.mark.parametrize("name", ["train", "sft", "eval", "train-tokenizer"])
def test_command_help_is_short_titled_and_names_only_real_fields(name, capsys):
    assert reso_hf_cli.main([name, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: reso-hf {name} ")
    assert len(text.splitlines()) <= 40
    assert f"reso-hf {name} --help-all lists every field" in text
    known = {f.name for cls in training_commands._argument_types(name) for f in fields(cls)}
    named = set(re.findall(r"^\s+--(\w+)", text, flags=re.MULTILINE)) - {"data"}  # eval's --data shorthand
    assert named and named <= known, named - known


def test_help_all_lists_every_field_under_the_command_name(capsys):
    assert reso_hf_cli.main(["train", "--help-all"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: reso-hf train ")
    for name in ("model_preset", "overwrite_output_dir", "assistant_only_loss", "learning_rate", "lr_scheduler_type"):
        assert f"--{name}" in text
    assert len(text.splitlines()) > 300  # every TrainingArguments field too


def test_user_errors_are_two_lines_and_exit_2(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: fast\n")
    assert reso_hf_cli.main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"reso-hf train: error: {recipe}: field 'learning_rate': invalid float value: 'fast'",
        "(reso-hf --debug train ..., or RESO_HF_DEBUG=1, shows the traceback)"]
    assert reso_hf_cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"reso-hf train: error: recipe file '{tmp_path / 'missing.yaml'}' does not exist")
    assert reso_hf_cli.main(["train", "--use_bundled_sample", "true", "--max_stepz", "3"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "reso-hf train: error: unknown flag --max_stepz; did you mean --max_steps?")
    assert reso_hf_cli.main(["eval", "--model", str(tmp_path / "no_such_model"), "--data", "x.jsonl"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"reso-hf eval: error: --model: '{tmp_path / 'no_such_model'}' does not exist, and it is not a Hub id "
        "either ('name' or 'namespace/name')")


def test_debug_flag_or_environment_shows_the_traceback(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: fast\n")
    with pytest.raises(ArgumentError, match="invalid float value"):
        reso_hf_cli.main(["train", str(recipe), "--debug"])
    with pytest.raises(ArgumentError, match="invalid float value"):
        reso_hf_cli.main(["--debug", "train", str(recipe)])
    monkeypatch.setenv("RESO_HF_DEBUG", "1")
    with pytest.raises(ArgumentError, match="invalid float value"):
        reso_hf_cli.main(["train", str(recipe)])


def test_debug_with_a_value_stays_a_training_argument():
    assert reso_hf_cli.pop_debug_flag(["train", "--debug", "underflow_overflow", "--debug"]) == (
        True, ["train", "--debug", "underflow_overflow"])
    assert reso_hf_cli.pop_debug_flag(["train", "--max_steps", "3"]) == (False, ["train", "--max_steps", "3"])


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        reso_hf_cli.main(["trian"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'trian' (choose from 'train'" in capsys.readouterr().err


def test_python_dash_m_entry_points_run_the_same_command():
    # `python -m reso_hf.cli` / `torchrun -m reso_hf.cli` and `python -m reso_hf.train` go through the launcher
    result = run_python("import runpy, sys; sys.argv = ['reso_hf.train', 'missing.yaml']; "
                        "runpy.run_module('reso_hf.train', run_name='__main__')")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-2:] == ["reso-hf train: error: recipe file 'missing.yaml' does not exist",
                                              "(reso-hf --debug train ..., or RESO_HF_DEBUG=1, shows the traceback)"]


def test_a_tokenizer_larger_than_the_model_vocabulary_is_named(tmp_path):
    from reso_hf.training.data import check_vocabulary

    tokenizer = reso_hf.create_default_tokenizer()
    model = reso_hf.ResoLLMForCausalLM(reso_hf.tiny_config(vocab_size=len(tokenizer) - 3, hidden_size=32,
                                                           intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=4, num_key_value_heads=2,
                                                           prime_code_dim=8))
    with pytest.raises(ValueError, match=rf"^outputs/m: the tokenizer has {len(tokenizer)} tokens but the model's "
                                         rf"embedding has only {len(tokenizer) - 3} rows; use the tokenizer"):
        check_vocabulary(tokenizer, model, "outputs/m")
    from reso_hf.training import pretrain
    from reso_hf.training.arguments import PretrainArguments

    with pytest.raises(ArgumentError, match=r"^config_overrides: vocab_size 100 is smaller than the tokenizer's"):
        pretrain.build_model(PretrainArguments(config_overrides=json.dumps({"vocab_size": 100})), tokenizer, 64)
