"""Hub sharing: cards from templates, validated metadata, push file selection, dry run, and self-sufficiency.

The real upload is tested at the `HfApi` boundary only (create_repo / upload_folder are replaced by recorders):
no stand-in of the Hub's HTTP API runs here.
"""

import json
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from isolation import run_without_reso_hf
from peft import get_peft_model

import reso_hf
from reso_hf import cli
from reso_hf.hub import CardError, PushError, push_to_hub_folder, render_adapter_card, render_model_card, select_files
from reso_hf.hub.cards import EVAL_RESULTS_SCHEMA, RUN_SUMMARY_SCHEMA, template_text

sys.path.insert(0, str(Path(__file__).parent / "dynamic_lora"))
from dynamic_lora_helpers import batch, small_config, tiny_llama  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def micro_config(**overrides) -> reso_hf.ResoLLMConfig:
    # Own copy (not `from conftest import`): under `pytest tests` the name `conftest` can resolve to
    # tests/dynamic_lora/conftest.py.
    defaults = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, prime_code_dim=8,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return reso_hf.ResoLLMConfig(**{**defaults, **overrides})

EVAL_RESULTS = {  # the shape `reso-hf eval` writes (reso_hf/training/evaluate.py)
    "schema": EVAL_RESULTS_SCHEMA,
    "created_at": "2025-01-02T00:00:00+00:00",
    "model": "outputs/x/model",
    "dataset": {"source": "bundled sample (reso_hf/data/guanaco_sample.jsonl)", "split": "eval", "rows": 12,
                "block_size": 64, "packing": True, "assistant_only_loss": True},
    "metrics": [{"type": "loss", "name": "held-out loss (nats/token)", "value": 2.71828},
                {"type": "perplexity", "name": "held-out perplexity", "value": math.exp(2.71828)}],
    "loss": 2.71828, "perplexity": math.exp(2.71828), "tokens": 4321,
    "stability": None, "samples": [],
}
RUN_SUMMARY = {
    "schema": RUN_SUMMARY_SCHEMA, "kind": "pretrain", "created_at": "2025-01-01T00:00:00+00:00",
    "model": {"model_type": "reso_llm", "preset": "tiny", "parameters": 27334, "trainable_parameters": 27334},
    "data": {"source": "timdettmers/openassistant-guanaco", "block_size": 64, "packing": True,
             "assistant_only_loss": True, "rows": {"train": 109, "eval": 12}},
    "training": {"global_step": 30, "epoch": 2.0, "train_loss": 3.25, "learning_rate": 0.0005, "seed": 7,
                 "world_size": 1, "train_runtime_s": 4.5},
}
TRAINING_JUNK = ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin",
                 "checkpoint-10/model.safetensors", ".hidden_notes", "half_written.json.tmp",
                 "reso_state.json", "runs/events.out.tfevents.1"]


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload))


@pytest.fixture
def recorder(monkeypatch):
    """Replace the HfApi network methods by recorders; `calls` lists (name, args, kwargs)."""
    calls = []

    class RepoUrl(str):
        repo_id = "user/reso-tiny"

    class CommitInfo:
        commit_url = "https://huggingface.co/user/reso-tiny/commit/0"

    def fake(name, result):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return result
        return method

    monkeypatch.setattr(HfApi, "create_repo", fake("create_repo", RepoUrl("https://huggingface.co/user/reso-tiny")))
    monkeypatch.setattr(HfApi, "upload_folder", fake("upload_folder", CommitInfo()))
    for name in ("create_commit", "upload_file", "whoami", "repo_info", "preupload_lfs_files"):
        monkeypatch.setattr(HfApi, name, fake(name, None))
    return calls


def save_model(folder: Path, metadata: bool = True):
    tokenizer = reso_hf.create_default_tokenizer()
    torch.manual_seed(0)
    model = reso_hf.ResoLLMForCausalLM(micro_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                    bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id)).eval()
    folder.mkdir(parents=True)
    if metadata:
        write_json(folder / "eval_results.json", EVAL_RESULTS)
        write_json(folder / "run_summary.json", RUN_SUMMARY)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "reso-tiny"
    model, tokenizer = save_model(folder)
    return folder, model, tokenizer


# ----- model cards -----------------------------------------------------------------------------------------


def test_save_pretrained_writes_a_validated_card_with_the_measured_eval_numbers(model_folder):
    folder, _, _ = model_folder
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert "reso-llm" in data["tags"] and data["license"] == "apache-2.0"
    assert data["datasets"] == ["timdettmers/openassistant-guanaco"]
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"loss", "perplexity"}
    assert results["loss"].metric_value == EVAL_RESULTS["metrics"][0]["value"] == 2.71828
    assert results["perplexity"].metric_value == EVAL_RESULTS["metrics"][1]["value"]
    assert {r.dataset_split for r in results.values()} == {"eval"}
    assert {r.dataset_type for r in results.values()} == {"local"}  # the bundled sample has no Hub page
    body = card.text
    assert "trust_remote_code=True" in body
    assert "| Kuramoto phase coupling | yes |" in body and "| Agency | no |" in body
    assert "| `num_hidden_layers` | 2 |" in body
    assert "| learning rate | 0.0005 |" in body and "| optimizer steps | 30 |" in body
    assert f"| held-out perplexity | {math.exp(2.71828):.4f} |" in body  # from eval_results.json
    assert "| held-out loss (nats/token) | 2.7183 |" in body and "split `eval`, 4,321 tokens" in body
    parameters = sum(p.numel() for p in model_folder[1].parameters())
    assert f"| parameters | {parameters:,} |" in body


def test_no_card_without_training_metadata_and_cli_card_renders_it(tmp_path, capsys):
    folder = tmp_path / "plain"
    save_model(folder, metadata=False)
    assert not (folder / "README.md").exists()  # nothing to say about training: no card from save_pretrained
    assert cli.main(["card", str(folder), "--license", "mit", "--repo", "someone/plain-model"]) == 0
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and card.data.eval_results is None
    assert 'repo = "someone/plain-model"' in card.text and "reports\nno quality numbers" in card.text


def test_model_card_metadata_set_on_the_model_triggers_the_hook(tmp_path):
    model = reso_hf.ResoLLMForCausalLM(micro_config())
    model.hub_card_metadata = {"license": "cc-by-4.0", "model_name": "Resonant Micro"}
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "cc-by-4.0" and card.text.lstrip().startswith("# Resonant Micro")
    model.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other" / "README.md").exists()  # hooks run on the main process only


def test_undefined_template_variable_is_a_clear_error(model_folder):
    folder, _, _ = model_folder
    template = "---\n{{ card_data }}\n---\n# {{ model_name }}\n{{ trained_by_whom }}\n"
    with pytest.raises(CardError, match="'trained_by_whom' is undefined"):
        render_model_card(folder, template=template)
    # the packaged templates use only variables that are always provided
    render_model_card(folder)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(schema="v0"), "field 'schema' must be 'reso-hf/eval_results/v1'"),
    (lambda p: p["metrics"][0].update(value=float("nan")), "metric 'loss' must have a finite number 'value'"),
    (lambda p: p["metrics"][1].update(value=3.0), "metric 'perplexity' must equal exp\\(loss\\)"),
    (lambda p: p["dataset"].pop("split"), "field 'dataset.split' must be a non-empty string"),
    (lambda p: p.update(metrics=[]), "field 'metrics' must be a non-empty list"),
    (lambda p: p["metrics"].append({"type": "loss", "value": 1.0}), "metric type 'loss' appears twice"),
])
def test_bad_eval_results_are_rejected_naming_the_field(tmp_path, model_folder, mutate, message):
    folder = tmp_path / "copy"
    shutil.copytree(model_folder[0], folder)
    payload = json.loads(json.dumps(EVAL_RESULTS))
    mutate(payload)
    (folder / "eval_results.json").write_text(json.dumps(payload, allow_nan=True))
    with pytest.raises(CardError, match=message):
        render_model_card(folder)


def test_invalid_license_and_missing_files_are_clear_errors(tmp_path, model_folder):
    with pytest.raises(CardError, match="license must be a Hub license id"):
        render_model_card(model_folder[0], license="Apache 2.0!")
    folder = tmp_path / "broken"
    shutil.copytree(model_folder[0], folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CardError, match="no weights file model.safetensors"):
        render_model_card(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CardError, match="no config.json"):
        render_model_card(folder)


# ----- push ------------------------------------------------------------------------------------------------


def add_junk(folder: Path) -> None:
    for name in TRAINING_JUNK:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 7)


def test_dry_run_prints_exactly_the_public_files_and_calls_nothing(tmp_path, model_folder, recorder, capsys):
    folder = tmp_path / "run"
    shutil.copytree(model_folder[0], folder)
    add_junk(folder)
    readme_before = (folder / "README.md").read_bytes()
    assert cli.main(["push", str(folder), "--repo", "user/reso-tiny", "--dry-run"]) == 0
    output = capsys.readouterr().out
    assert recorder == []
    assert (folder / "README.md").read_bytes() == readme_before  # the dry run writes nothing

    plan = push_to_hub_folder(folder, "user/reso-tiny", dry_run=True)
    listed = [line.split()[0] for line in output.splitlines() if line.endswith(" B")]
    assert listed == [path for path, _ in plan.files]
    for path, size in plan.files:
        assert f"{size:,} B" in next(line for line in output.splitlines() if line.split()[0] == path)
        if path != "README.md":
            assert (folder / path).stat().st_size == size
    readme_size = dict(plan.files)["README.md"]
    assert readme_size == len(plan.card.encode()) and plan.card.count("your-username") == 0
    assert set(listed) == {p.name for p in model_folder[0].iterdir()}  # junk left out, nothing else
    left_out = dict(plan.left_out)
    assert set(left_out) == set(TRAINING_JUNK)
    assert left_out["optimizer.pt"] == "pickle format" and left_out["trainer_state.json"] == "training state"
    assert left_out["checkpoint-10/model.safetensors"] == "training checkpoint"
    assert left_out["reso_state.json"].startswith("ResoLLM runtime memory")
    assert "Left out:" in output and "optimizer.pt" in output


def test_push_calls_the_hub_api_with_exactly_the_dry_run_selection(tmp_path, model_folder, recorder, capsys):
    folder = tmp_path / "run"
    shutil.copytree(model_folder[0], folder)
    add_junk(folder)
    dry = push_to_hub_folder(folder, "user/reso-tiny", dry_run=True)
    assert cli.main(["push", str(folder), "--repo", "user/reso-tiny", "--private", "--commit-message", "v1"]) == 0
    assert [name for name, _, _ in recorder] == ["create_repo", "upload_folder"]
    _, args, kwargs = recorder[0]
    assert args == ("user/reso-tiny",) and kwargs["private"] is True and kwargs["exist_ok"] is True
    _, _, upload = recorder[1]
    assert upload["repo_id"] == "user/reso-tiny" and upload["folder_path"] == str(folder)
    assert upload["commit_message"] == "v1" and upload["allow_patterns"] == [p for p, _ in dry.files]
    # What upload_folder itself would keep with these patterns (its own filter) is the dry-run list.
    everything = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = list(filter_repo_objects(everything, allow_patterns=upload["allow_patterns"],
                                    ignore_patterns=upload["ignore_patterns"]))
    assert kept == [p for p, _ in dry.files]
    assert ModelCard.load(folder / "README.md").text.count('repo = "user/reso-tiny"') == 1  # card re-rendered
    assert "commit/0" in capsys.readouterr().out


@pytest.mark.parametrize("repo_id", ["user/name with space", "user/na--me", "a/b/c", "user/name.git", "noslash",
                                     "user/ünïcode"])
def test_invalid_repo_id_fails_before_any_network_call(model_folder, recorder, capsys, repo_id):
    assert cli.main(["push", str(model_folder[0]), "--repo", repo_id]) == 2
    assert recorder == []
    error = capsys.readouterr().err
    assert "repo id" in error and repr(repo_id) in error
    with pytest.raises(PushError, match="repo id"):
        push_to_hub_folder(model_folder[0], repo_id)
    assert recorder == []


def test_missing_weights_config_or_card_fail_before_any_network_call(tmp_path, model_folder, recorder, capsys):
    folder = tmp_path / "broken"
    shutil.copytree(model_folder[0], folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(PushError, match="no weights file model.safetensors"):
        push_to_hub_folder(folder, "user/reso-tiny")
    shutil.copy(model_folder[0] / "model.safetensors", folder)
    (folder / "config.json").unlink()
    assert cli.main(["push", str(folder), "--repo", "user/reso-tiny"]) == 2
    assert "no config.json" in capsys.readouterr().err
    shutil.copy(model_folder[0] / "config.json", folder)
    (folder / "README.md").unlink()
    with pytest.raises(PushError, match="keep_card=True but .* has no README.md"):
        push_to_hub_folder(folder, "user/reso-tiny", keep_card=True)
    (folder / "eval_results.json").write_text('{"schema": "reso-hf/eval_results/v1"}')
    with pytest.raises(CardError, match="field 'dataset'"):
        push_to_hub_folder(folder, "user/reso-tiny")
    assert recorder == []


# ----- adapters --------------------------------------------------------------------------------------------

BASE_ID = "example-org/tiny-llama-base"


def dynamic_adapter(private_context: bool = True):
    privacy = {"context": "private"} if private_context else {}
    model = get_peft_model(tiny_llama(), small_config(tier_privacy=privacy, init_weights=False))
    model.peft_config["default"].base_model_name_or_path = BASE_ID
    return model


def test_adapter_card_from_the_save_hook_has_tiers_privacy_and_health(tmp_path, recorder):
    model = dynamic_adapter()
    folder = tmp_path / "adapter"
    folder.mkdir()
    write_json(folder / "run_summary.json", {**RUN_SUMMARY, "kind": "sft",
                                             "model": {"base_model": BASE_ID, "trainable_parameters": 1234}})
    write_json(folder / "eval_results.json", EVAL_RESULTS)
    model.save_pretrained(folder)
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["base_model"] == BASE_ID and "dynamic-lora" in data["tags"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        m["type"]: m["value"] for m in EVAL_RESULTS["metrics"]}
    assert "| context | 2 | 0.1 | session | private | no |" in card.text
    assert "| foundation | 8 | 0.99 | shared | public | yes |" in card.text
    assert "The tiers context are marked `private`" in card.text
    health = json.loads((folder / "adapter_health.json").read_text())
    assert f"State **{health['health']}** at step 0" in card.text
    assert "import reso_hf" in card.text

    plan = push_to_hub_folder(folder, "user/tiny-adapter", dry_run=True)
    assert [p for p, _ in plan.files] == ["README.md", "adapter_config.json", "adapter_health.json",
                                          "adapter_model.safetensors", "eval_results.json", "run_summary.json"]
    # A save without the private tier writes no per-element dynamics (only a note and the audit log).
    assert {p for p, _ in plan.left_out} == {"dynamic_lora_state.json", "dynamic_lora_audit.jsonl"}
    with_state = push_to_hub_folder(folder, "user/tiny-adapter", dry_run=True, include_training_state=True)
    assert {p for p, _ in with_state.files} >= {"dynamic_lora_audit.jsonl", "dynamic_lora_state.json"}
    assert recorder == []


def test_private_tier_weights_are_never_pushed(tmp_path, recorder, capsys):
    model = dynamic_adapter()
    folder = tmp_path / "with-private"
    model.base_model.save_pretrained(folder, include_private=True)
    assert cli.main(["push", str(folder), "--repo", "user/tiny-adapter", "--dry-run"]) == 2
    assert "holds tiers ['context'] marked private" in capsys.readouterr().err
    plan = push_to_hub_folder(folder, "user/tiny-adapter", dry_run=True, include_private=True)
    assert "adapter_model.safetensors" in dict(plan.files)
    assert dict(plan.left_out)["dynamic_lora_state.safetensors"] == "DynamicLoRA dynamics state"
    with pytest.raises(PushError, match="dynamic_lora_state.safetensors holds tiers \\['context'\\] marked private"):
        (folder / "adapter_model.safetensors").unlink()
        model.base_model.save_pretrained(folder)  # public tiers only, but the full dynamics state stays behind
        push_to_hub_folder(folder, "user/tiny-adapter", dry_run=True, include_training_state=True)
    assert recorder == []


def test_adapter_without_a_hub_base_model_is_a_clear_error(tmp_path):
    model = get_peft_model(tiny_llama(), small_config())
    model.save_pretrained(tmp_path)
    with pytest.raises(CardError, match="no base_model_name_or_path"):
        render_adapter_card(tmp_path)
    card = render_adapter_card(tmp_path, base_model=BASE_ID)
    assert card.data.base_model == BASE_ID
    with pytest.raises(CardError, match="'base_model' must be a Hub model id"):
        render_adapter_card(tmp_path, base_model="/local/path/to/model")


# ----- package data ----------------------------------------------------------------------------------------


def test_templates_are_found_from_a_built_wheel(tmp_path):
    # Build from a copy so the shared checkout gets no build/ or egg-info changes.
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(REPO_ROOT / "pyproject.toml", source)
    shutil.copy(REPO_ROOT / "README.md", source)
    shutil.copytree(REPO_ROOT / "reso_hf", source / "reso_hf", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=240)
    wheel = next((tmp_path / "dist").glob("reso_hf-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {"reso_hf/hub_cards/model_card.md.jinja", "reso_hf/hub_cards/adapter_card.md.jinja",
                "reso_hf/hub/cards.py"} <= names
        archive.extractall(tmp_path / "site")
    # Import reso_hf from the unpacked wheel (not the checkout) and read the templates through it.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import reso_hf.hub.cards as c; "
            "print(c.__file__); print(len(c.template_text('model_card.md.jinja')))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], cwd=tmp_path, check=True,
                            capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    module_file, length = result.stdout.split()
    assert module_file.startswith(str(tmp_path / "site"))
    assert int(length) == len(template_text("model_card.md.jinja"))


# ----- self-sufficiency ------------------------------------------------------------------------------------


def copy_upload(folder: Path, destination: Path, **options) -> list[str]:
    """Copy exactly the files a push would upload (with the rendered card) into `destination`."""
    plan = push_to_hub_folder(folder, "user/reso-tiny", dry_run=True, **options)
    for path, _ in plan.files:
        target = destination / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if path == "README.md":
            target.write_text(plan.card)
        else:
            shutil.copy(folder / path, target)
    return [p for p, _ in plan.files]


def test_uploaded_folders_load_without_reso_hf(tmp_path, model_folder):
    folder, model, tokenizer = model_folder
    uploaded = tmp_path / "uploaded-model"
    files = copy_upload(folder, uploaded)
    config = json.loads((uploaded / "config.json").read_text())
    tokenizer_config = json.loads((uploaded / "tokenizer_config.json").read_text())
    references = list(config["auto_map"].values()) + [e for e in tokenizer_config["auto_map"]["AutoTokenizer"] if e]
    for reference in references:
        assert f"{reference.split('.')[0]}.py" in files, reference
    assert {"model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= set(files)

    # An exported DynamicLoRA adapter, through the same selection, loads with plain PEFT.
    peft_model = dynamic_adapter(private_context=False)  # the export holds every tier: same outputs
    ids = batch()
    with torch.no_grad():
        lora_expected = peft_model(input_ids=ids).logits.numpy()
    export = tmp_path / "export"
    peft_model.base_model.export_lora(str(export))
    render_adapter_card(export)  # base_model comes from the exported adapter_config.json
    uploaded_lora = tmp_path / "uploaded-lora"
    copy_upload(export, uploaded_lora)
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)

    prompt_ids = tokenizer("A prime example")["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([prompt_ids])).logits[0].numpy()
    np.savez(tmp_path / "expected.npz", model=expected, lora=lora_expected, ids=ids.numpy())
    output = run_without_reso_hf(
        f"""
        import json, numpy as np, torch
        from huggingface_hub import ModelCard
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        expected = np.load({str(tmp_path / "expected.npz")!r})
        folder = {str(uploaded)!r}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        generation = GenerationConfig.from_pretrained(folder)
        card = ModelCard.load(folder + "/README.md")
        ids = tokenizer("A prime example")["input_ids"]
        with torch.no_grad():
            assert np.array_equal(model(torch.tensor([ids])).logits[0].numpy(), expected["model"])
        assert card.data.library_name == "transformers" and "reso-llm" in card.data.tags
        assert generation.eos_token_id == {tokenizer.eos_token_id}
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
        lora = PeftModel.from_pretrained(base, {str(uploaded_lora)!r}).eval()
        with torch.no_grad():
            logits = lora(input_ids=torch.tensor(expected["ids"])).logits.numpy()
        assert np.allclose(logits, expected["lora"], atol=1e-5), abs(logits - expected["lora"]).max()
        print(type(model).__module__, type(lora.peft_config["default"]).__name__,
              ModelCard.load({str(uploaded_lora)!r} + "/README.md").data.library_name)
        """,
        tmp_path,
    )
    module, lora_config, library = output.split()
    assert module.startswith("transformers_modules.") and lora_config == "LoraConfig" and library == "peft"
