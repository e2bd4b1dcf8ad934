"""Model cards (ResoLLM checkpoints) and adapter cards (DynamicLoRA / exported LoRA) from `hub_cards/`.

A card is rendered from what lies in the saved folder, never from numbers typed by hand:

- `config.json` (model) or `adapter_config.json` + `adapter_model.safetensors` (adapter): configuration,
  enabled components, tier layout, which tiers are in the folder, parameter counts;
- `run_summary.json` (optional, written by `reso-hf train` / `reso-hf sft`): training data and
  hyper-parameters, see `RUN_SUMMARY_FIELDS`;
- `eval_results.json` (optional, written by `reso-hf eval`): the ONLY source of the `model-index` results and
  of the evaluation section, see `EVAL_RESULTS_SCHEMA`;
- `adapter_health.json` (optional, written by the adapter save hook): `DynamicLoraModel.health()` at save time.

The templates are rendered with jinja2 `StrictUndefined` (an undefined variable is an error naming it); the
YAML header comes from `huggingface_hub.ModelCardData`, and the result is parsed back with
`huggingface_hub.ModelCard` and checked by `validate_card_metadata`.

eval_results.json (schema "reso-hf/eval_results/v1"; written by `reso-hf eval`, reso_hf/training/evaluate.py);
the card reads and checks:

    schema      "reso-hf/eval_results/v1"                                   required
    dataset     {"source": str (Hub id, local files or the bundled sample),  required
                 "split": str,                                              required
                 "name": str (optional; shown and put in the model-index instead of source, which may be a
                 local path), "id": Hub dataset id (optional; else source when it is one), "config",
                 "revision" (optional)}
    metrics     [{"type": "loss" | "perplexity" | ..., "name": str, "value": finite number}, ...]  required,
                non-empty, types unique; "loss" is the mean cross-entropy in nats/token and, when both are
                present, "perplexity" must equal exp(loss)
    tokens      int, tokens scored (optional)
    created_at, model, loss, perplexity, stability, samples: written by reso-hf eval, not read by the card

run_summary.json (schema "reso-hf/run_summary/v1", defined in `reso_hf/training/reporting.py`); the card reads:

    schema, kind, created_at,
    model.{preset, base_model, parameters, trainable_parameters},
    data.{dataset_id (optional Hub id of the training data), source, block_size, packing,
          assistant_only_loss, chat_template, rows, malformed_rows},
    training.{global_step, epoch, train_loss, train_runtime_s, train_tokens, world_size, seed, learning_rate},
    dynamic_lora.health (adapters, used when no adapter_health.json is present)
"""

from __future__ import annotations

import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..dynamic_lora.serialization import atomic_write_text

MODEL_CARD_TEMPLATE = "model_card.md.jinja"
ADAPTER_CARD_TEMPLATE = "adapter_card.md.jinja"
CARD_NAME = "README.md"
EVAL_RESULTS_NAME = "eval_results.json"
EVAL_RESULTS_SCHEMA = "reso-hf/eval_results/v1"
RUN_SUMMARY_NAME = "run_summary.json"
RUN_SUMMARY_SCHEMA = "reso-hf/run_summary/v1"
ADAPTER_HEALTH_NAME = "adapter_health.json"

MODEL_TAGS = ("reso-llm", "custom_code", "text-generation")
ADAPTER_TAGS = ("dynamic-lora", "peft", "lora")
DEFAULT_LICENSE = "apache-2.0"
_LICENSE_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
_TIER_KEY = re.compile(r"\.dynamic_lora_[AB]\.(?P<tier>[^.]+)$")

# Config fields shown in the configuration table, in this order (those present in config.json).
MODEL_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "hidden_act", "rms_norm_eps", "rope_theta",
    "tie_word_embeddings", "prime_code_dim", "kuramoto_coupling_init", "coherence_threshold",
    "coherence_sharpness", "dtype",
)
# (name, config key, description); a dict-valued key is a sub-config with an `enabled` switch.
MODEL_COMPONENTS = (
    ("Prime token codes", "prime_embedding", "fixed prime-derived code added to each token embedding"),
    ("Rotary spectrum", "rope_spectrum", "frequencies of the rotary position encoding (golden or geometric)"),
    ("Kuramoto phase coupling", "kuramoto", "causal mean-field phase coupling between attention positions"),
    ("Coherence gate", "coherence_gating", "per-position gate on the residual update driven by phase coherence"),
    ("Stability monitor", "stability", "entropy and Lyapunov estimate during generation, optional auto temperature"),
    ("Stochastic resonance", "stochastic_resonance", "logit noise when the output starts repeating"),
    ("Agency", "agency", "goal slots and attention foci"),
    ("PRSC", "prsc", "concept bank after the embedding"),
    ("Temporal SMF memory", "temporal_smf", "episodic memory store with memory prefix slots"),
    ("Entanglement", "entanglement", "memory and goals shared between agents of a group"),
)


class CardError(ValueError):
    """A card cannot be rendered or its metadata is invalid; the message names the field and allowed values."""


# ----- files ---------------------------------------------------------------------------------------------


def template_text(name: str) -> str:
    """A template of `reso_hf/hub_cards/` (package data, so it works from an installed wheel)."""
    allowed = (MODEL_CARD_TEMPLATE, ADAPTER_CARD_TEMPLATE)
    if name not in allowed:
        raise CardError(f"unknown card template {name!r}; allowed: {list(allowed)}")
    return resources.files("reso_hf").joinpath("hub_cards", name).read_text(encoding="utf-8")


def render_template(source: str, context: dict, template_name: str = "<template>") -> str:
    """Render with StrictUndefined: a variable the template uses but `context` lacks is an error naming it."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    try:
        return environment.from_string(source).render(**context)
    except jinja2.UndefinedError as error:
        raise CardError(
            f"card template {template_name}: {error.message}; variables provided: {sorted(context)}"
        ) from error


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise CardError(f"{path} is not valid JSON: {error}") from error


def folder_kind(folder: str | os.PathLike) -> str:
    """"model" (a ResoLLM checkpoint) or "adapter" (a PEFT adapter folder); errors name what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CardError(f"{folder} is not a directory")
    if (folder / "adapter_config.json").is_file():
        if not (folder / "adapter_model.safetensors").is_file():
            raise CardError(f"{folder} has adapter_config.json but no adapter weights adapter_model.safetensors")
        return "adapter"
    if not (folder / "config.json").is_file():
        raise CardError(
            f"{folder} has no config.json (model) or adapter_config.json (adapter): not a saved checkpoint"
        )
    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        raise CardError(f"{folder} has config.json but no weights file model.safetensors (or model.safetensors.index.json)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CardError(f"{folder} is missing weight shards {missing} listed in model.safetensors.index.json")
    return "model"


def _weight_files(folder: Path, kind: str) -> list[Path]:
    if kind == "adapter":
        return [folder / "adapter_model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / s for s in sorted(set(_read_json(index)["weight_map"].values()))]
    return [folder / "model.safetensors"]


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors header (the tensors are not loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}


def count_parameters(folder: Path, kind: str) -> int:
    return sum(math.prod(shape) for path in _weight_files(folder, kind) for shape in safetensors_shapes(path).values())


# ----- eval_results.json and run_summary.json ------------------------------------------------------------


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_eval_results(folder: str | os.PathLike) -> Optional[dict]:
    """The validated eval_results.json of `folder`, or None when there is none (see the module docstring)."""
    path = Path(folder) / EVAL_RESULTS_NAME
    if not path.is_file():
        return None
    return validate_eval_results(_read_json(path), str(path))


def validate_eval_results(payload: Any, source: str = EVAL_RESULTS_NAME) -> dict:
    if not isinstance(payload, dict):
        raise CardError(f"{source}: must be a JSON object, got {type(payload).__name__}")
    if payload.get("schema") != EVAL_RESULTS_SCHEMA:
        raise CardError(f"{source}: field 'schema' must be {EVAL_RESULTS_SCHEMA!r}, got {payload.get('schema')!r}")
    dataset = payload.get("dataset")
    if not isinstance(dataset, dict):
        raise CardError(f"{source}: field 'dataset' must be an object with 'source' and 'split', got {dataset!r}")
    for key in ("source", "split"):
        if not isinstance(dataset.get(key), str) or not dataset[key]:
            raise CardError(f"{source}: field 'dataset.{key}' must be a non-empty string, got {dataset.get(key)!r}")
    for key in ("name", "id", "config", "revision"):
        if dataset.get(key) is not None and not isinstance(dataset[key], str):
            raise CardError(f"{source}: field 'dataset.{key}' must be a string or null, got {dataset[key]!r}")
    if dataset.get("id") is not None:
        try:
            validate_repo_id(dataset["id"])
        except HFValidationError as error:
            raise CardError(f"{source}: field 'dataset.id' must be a Hub dataset id or null: {error}") from error
    metrics = payload.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        raise CardError(f"{source}: field 'metrics' must be a non-empty list of "
                        f"{{'type', 'name', 'value'}} objects, got {metrics!r}")
    values = {}
    for index, metric in enumerate(metrics):
        if not isinstance(metric, dict) or not isinstance(metric.get("type"), str) or not metric["type"]:
            raise CardError(f"{source}: metrics[{index}] must be an object with a non-empty string 'type', got {metric!r}")
        if metric["type"] in values:
            raise CardError(f"{source}: metric type {metric['type']!r} appears twice in 'metrics'")
        if not _finite_number(metric.get("value")):
            raise CardError(f"{source}: metric {metric['type']!r} must have a finite number 'value', "
                            f"got {metric.get('value')!r}")
        if metric.get("name") is not None and not isinstance(metric["name"], str):
            raise CardError(f"{source}: metric {metric['type']!r} has a non-string 'name' {metric['name']!r}")
        values[metric["type"]] = metric["value"]
    if "loss" in values and "perplexity" in values:
        expected = math.exp(min(values["loss"], 50.0))
        if not math.isclose(values["perplexity"], expected, rel_tol=1e-4):
            raise CardError(f"{source}: metric 'perplexity' must equal exp(loss) = {expected:.6g}, "
                            f"got {values['perplexity']!r}")
    tokens = payload.get("tokens")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0):
        raise CardError(f"{source}: field 'tokens' must be a non-negative integer or null, got {tokens!r}")
    return payload


def _hub_dataset_id(source) -> Optional[str]:
    """`source` when it is a Hub dataset id (not a local path or the bundled sample), else None."""
    if not isinstance(source, str) or source.count("/") != 1 or os.path.exists(source):
        return None
    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    return source


def load_run_summary(folder: str | os.PathLike) -> Optional[dict]:
    """The run_summary.json of `folder` (checked for the fields the card reads), or None when there is none."""
    path = Path(folder) / RUN_SUMMARY_NAME
    if not path.is_file():
        return None
    summary = _read_json(path)
    if not isinstance(summary, dict):
        raise CardError(f"{path}: must be a JSON object, got {type(summary).__name__}")
    if summary.get("schema") != RUN_SUMMARY_SCHEMA:
        raise CardError(f"{path}: field 'schema' must be {RUN_SUMMARY_SCHEMA!r}, got {summary.get('schema')!r}")
    for key in ("model", "data", "training"):
        if not isinstance(summary.get(key), dict):
            raise CardError(f"{path}: field {key!r} must be an object, got {summary.get(key)!r}")
    if not isinstance(summary.get("kind"), str):
        raise CardError(f"{path}: field 'kind' must be a string such as 'pretrain' or 'sft', got {summary.get('kind')!r}")
    return summary


# ----- context pieces ------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def _training_context(summary: Optional[dict]) -> Optional[dict]:
    if summary is None:
        return None
    model, data, training = summary["model"], summary["data"], summary["training"]
    data_lines = []
    for key, label in (("block_size", "block size"), ("packing", "packing"),
                       ("assistant_only_loss", "loss on assistant tokens only"), ("chat_template", "chat template"),
                       ("rows", "rows per split"), ("malformed_rows", "malformed rows skipped per split")):
        if key in data:
            data_lines.append(f"{label}: {_fmt(data[key])}")
    rows = []
    for key, label in (("preset", "model preset"), ("base_model", "base model"), ("parameters", "parameters"),
                       ("trainable_parameters", "trainable parameters")):
        if model.get(key) is not None:
            rows.append((label, _fmt(model[key])))
    for key, label in (("learning_rate", "learning rate"), ("global_step", "optimizer steps"), ("epoch", "epochs"),
                       ("train_tokens", "training tokens"), ("world_size", "processes"), ("seed", "seed"),
                       ("train_loss", "final mean training loss"), ("train_runtime_s", "training time (s)")):
        if training.get(key) is not None:
            rows.append((label, _fmt(training[key])))
    return {"kind": summary["kind"], "created_at": summary.get("created_at", "n/a"),
            "data_source": _fmt(data.get("source", "not recorded")), "data_lines": data_lines, "rows": rows}


def _evaluation_context(results: Optional[dict]) -> Optional[dict]:
    if results is None:
        return None
    metrics = [(m.get("name") or m["type"], f"{m['value']:.4f}" if isinstance(m["value"], float) else _fmt(m["value"]))
               for m in results["metrics"]]
    return {"dataset_name": _fmt(_dataset_name(results["dataset"])), "split": results["dataset"]["split"],
            "num_tokens": None if results.get("tokens") is None else _fmt(results["tokens"]), "metrics": metrics}


def _dataset_name(dataset: dict) -> str:
    """The recorded name (never a local path); results written before names were recorded have only the source."""
    return dataset.get("name") or dataset["source"]


def _eval_results_entries(results: Optional[dict], model_name: str) -> Optional[list[EvalResult]]:
    if results is None:
        return None
    dataset = results["dataset"]
    dataset_id = dataset.get("id") or _hub_dataset_id(dataset["source"])
    return [
        EvalResult(task_type="text-generation", task_name="Causal language modeling",
                   dataset_type=dataset_id or "local", dataset_name=_dataset_name(dataset),
                   dataset_config=dataset.get("config"), dataset_split=dataset["split"],
                   dataset_revision=dataset.get("revision"), metric_type=metric["type"],
                   metric_name=metric.get("name") or metric["type"], metric_value=float(metric["value"]))
        for metric in results["metrics"]
    ]


def _training_datasets(summary: Optional[dict], extra: Optional[list[str]]) -> Optional[list[str]]:
    datasets = list(extra or [])
    if summary is not None:
        data = summary["data"]
        # A Hub id, not a local path or the bundled sample (those have no Hub page to link).
        candidate = data.get("dataset_id") or _hub_dataset_id(data.get("source"))
        if candidate and candidate not in datasets:
            datasets.append(candidate)
    return datasets or None


def _check_license(license: str) -> str:
    if not isinstance(license, str) or not _LICENSE_RE.match(license):
        raise CardError(f"license must be a Hub license id such as 'apache-2.0', 'mit' or 'other', got {license!r}")
    return license


def _versions() -> dict:
    import peft
    import transformers

    import reso_hf

    return {"reso_hf_version": reso_hf.__version__, "transformers_version": transformers.__version__,
            "peft_version": peft.__version__}


def _assemble(template_name: str, template_source: Optional[str], card_data: ModelCardData, context: dict,
              kind: str) -> ModelCard:
    source = template_text(template_name) if template_source is None else template_source
    text = render_template(source, {"card_data": card_data.to_yaml(), **context},
                           template_name if template_source is None else "<custom template>")
    try:
        card = ModelCard(text)
    except ValueError as error:
        raise CardError(f"rendered {kind} card has invalid metadata: {error}") from error
    validate_card_metadata(card, kind)
    return card


def validate_card_metadata(card: ModelCard, kind: str) -> None:
    """The YAML header of a reso-hf card: every field the Hub uses for a model or adapter page, well formed."""
    if kind not in ("model", "adapter"):
        raise CardError(f"card kind must be 'model' or 'adapter', got {kind!r}")
    data = card.data.to_dict()
    expected_library = "transformers" if kind == "model" else "peft"
    if data.get("library_name") != expected_library:
        raise CardError(f"card metadata 'library_name' must be {expected_library!r}, got {data.get('library_name')!r}")
    if data.get("pipeline_tag") != "text-generation":
        raise CardError(f"card metadata 'pipeline_tag' must be 'text-generation', got {data.get('pipeline_tag')!r}")
    tags = data.get("tags")
    required_tag = "reso-llm" if kind == "model" else "dynamic-lora"
    if not isinstance(tags, list) or required_tag not in tags or not all(isinstance(t, str) for t in tags):
        raise CardError(f"card metadata 'tags' must be a list of strings containing {required_tag!r}, got {tags!r}")
    _check_license(data.get("license"))
    datasets = data.get("datasets")
    if datasets is not None:
        if not isinstance(datasets, list) or not datasets:
            raise CardError(f"card metadata 'datasets' must be a non-empty list of Hub dataset ids, got {datasets!r}")
        for dataset in datasets:
            try:
                validate_repo_id(dataset)
            except HFValidationError as error:
                raise CardError(f"card metadata 'datasets' entry {dataset!r} is not a Hub dataset id: {error}") from error
    base_model = data.get("base_model")
    if kind == "adapter" and base_model is None:
        raise CardError("adapter card metadata needs 'base_model' (the Hub id of the model the adapter was trained on)")
    if base_model is not None:
        try:
            validate_repo_id(base_model)
        except HFValidationError as error:
            raise CardError(f"card metadata 'base_model' must be a Hub model id, got {base_model!r}: {error}") from error
    for result in card.data.eval_results or []:
        if not _finite_number(result.metric_value):
            raise CardError(f"model-index metric {result.metric_type!r} must be a finite number, got {result.metric_value!r}")


# ----- model cards ---------------------------------------------------------------------------------------


def render_model_card(
    folder: str | os.PathLike,
    *,
    repo_id: Optional[str] = None,
    model_name: Optional[str] = None,
    license: str = DEFAULT_LICENSE,
    datasets: Optional[list[str]] = None,
    base_model: Optional[str] = None,
    template: Optional[str] = None,
) -> ModelCard:
    """The model card of a saved ResoLLM folder (`template`: a template text replacing the packaged one)."""
    folder = Path(folder)
    kind = folder_kind(folder)
    if kind != "model":
        raise CardError(f"{folder} holds an adapter; use render_adapter_card")
    config = _read_json(folder / "config.json")
    if config.get("model_type") != "reso_llm":
        raise CardError(f"{folder}/config.json has model_type {config.get('model_type')!r}; model cards are for 'reso_llm'")
    summary, results = load_run_summary(folder), load_eval_results(folder)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else folder.resolve().name)
    if base_model is None and summary is not None:
        base_model = summary["model"].get("base_model")
    source_model = config.get("source_model")
    if base_model is None and isinstance(source_model, str) and not os.path.exists(source_model):
        base_model = source_model  # converted from a Hub model (`from_llama`): that is its base
    card_data = ModelCardData(
        model_name=model_name, library_name="transformers", pipeline_tag="text-generation",
        tags=list(MODEL_TAGS), license=_check_license(license), base_model=base_model,
        datasets=_training_datasets(summary, datasets), eval_results=_eval_results_entries(results, model_name),
    )
    components = []
    for name, key, description in MODEL_COMPONENTS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("enabled", False)
        state = value if isinstance(value, str) else ("yes" if value else "no")
        components.append({"name": name, "state": state, "description": description})
    context = {
        **_versions(),
        "model_name": model_name,
        "load_id": repo_id or f"your-username/{model_name}",
        "config_rows": [(key, _fmt(config[key])) for key in MODEL_CONFIG_FIELDS if config.get(key) is not None],
        "parameters": _fmt(count_parameters(folder, kind)),
        "components": components,
        "training": _training_context(summary),
        "evaluation": _evaluation_context(results),
    }
    return _assemble(MODEL_CARD_TEMPLATE, template, card_data, context, "model")


# ----- adapter cards -------------------------------------------------------------------------------------


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # tensor / numpy scalar
        return _json_safe(value.item())
    return value


def _health_context(health: Optional[dict]) -> Optional[dict]:
    if health is None:
        return None
    rows = [(key.replace("_", " "), _fmt(health[key])) for key in
            ("queue_depth", "average_wait", "conflict_rate", "truncation_error", "healthy_fraction") if key in health]
    for name, count in sorted((health.get("counters") or {}).items()):
        rows.append((f"count: {name}", _fmt(count)))
    return {"state": health.get("health", "not recorded"), "step": _fmt(health.get("step")),
            "reasons": [str(r) for r in health.get("health_reasons") or []], "rows": rows}


def render_adapter_card(
    folder: str | os.PathLike,
    *,
    repo_id: Optional[str] = None,
    model_name: Optional[str] = None,
    license: str = DEFAULT_LICENSE,
    datasets: Optional[list[str]] = None,
    base_model: Optional[str] = None,
    health: Optional[dict] = None,
    template: Optional[str] = None,
) -> ModelCard:
    """The adapter card of a saved DynamicLoRA adapter (or of its plain-LoRA export).

    `health` is `DynamicLoraModel.health()` at save time; when None it is read from adapter_health.json, then
    from run_summary.json's dynamic_lora.health.
    """
    from ..dynamic_lora.config import DEFAULT_TIER_INERTIA, DEFAULT_TIER_RANKS, TIER_SCOPES

    folder = Path(folder)
    if folder_kind(folder) != "adapter":
        raise CardError(f"{folder} holds a model checkpoint; use render_model_card")
    config = _read_json(folder / "adapter_config.json")
    peft_type = config.get("peft_type")
    if peft_type not in ("DYNAMIC_LORA", "LORA"):
        raise CardError(f"{folder}/adapter_config.json has peft_type {peft_type!r}; allowed: ['DYNAMIC_LORA', 'LORA']")
    summary, results = load_run_summary(folder), load_eval_results(folder)
    base_model = base_model or config.get("base_model_name_or_path")
    if not base_model:
        raise CardError(f"{folder}/adapter_config.json has no base_model_name_or_path; pass base_model= "
                        "(reso-hf card/push --base_model) with the Hub id of the base model")
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else folder.resolve().name)
    is_dynamic = peft_type == "DYNAMIC_LORA"
    tags = list(ADAPTER_TAGS) + [f"base_model:adapter:{base_model}"]
    card_data = ModelCardData(
        model_name=model_name, library_name="peft", pipeline_tag="text-generation", tags=tags,
        license=_check_license(license), base_model=base_model, datasets=_training_datasets(summary, datasets),
        eval_results=_eval_results_entries(results, model_name),
    )
    shapes = safetensors_shapes(folder / "adapter_model.safetensors")
    target_modules = config.get("target_modules")
    adapter_rows = [("PEFT type", peft_type), ("task type", _fmt(config.get("task_type"))),
                    ("target modules", _fmt(sorted(target_modules) if isinstance(target_modules, list) else target_modules)),
                    ("parameters in this folder", _fmt(sum(math.prod(s) for s in shapes.values())))]
    tiers, private_tiers, total_rank = [], [], config.get("r")
    if is_dynamic:
        saved = {m["tier"] for key in shapes if (m := _TIER_KEY.search(key))}
        ranks, inertia, privacy = (config.get("tier_ranks") or {}), (config.get("tier_inertia") or {}), (config.get("tier_privacy") or {})
        for tier in config.get("tiers") or []:
            entry = {"name": tier, "rank": int(ranks.get(tier, DEFAULT_TIER_RANKS[tier])),
                     "inertia": _fmt(float(inertia.get(tier, DEFAULT_TIER_INERTIA[tier]))),
                     "scope": TIER_SCOPES[tier], "privacy": privacy.get(tier, "public"), "saved": tier in saved}
            tiers.append(entry)
            if entry["privacy"] == "private":
                private_tiers.append(tier)
        total_rank = sum(t["rank"] for t in tiers)
        adapter_rows += [("tiers (slowest first)", _fmt([t["name"] for t in tiers])), ("total rank", _fmt(total_rank)),
                         ("dynamics", "on" if config.get("dynamics_enabled", True) else "off")]
        if health is None and (folder / ADAPTER_HEALTH_NAME).is_file():
            health = _read_json(folder / ADAPTER_HEALTH_NAME)
        if health is None and summary is not None:
            health = (summary.get("dynamic_lora") or {}).get("health")
            if health is not None and not isinstance(health, dict):
                health = {"health": str(health)}
    else:
        adapter_rows += [("rank", _fmt(config.get("r"))), ("lora_alpha", _fmt(config.get("lora_alpha")))]
    context = {
        **_versions(),
        "model_name": model_name,
        "load_id": repo_id or f"your-username/{model_name}",
        "base_model": base_model,
        "is_dynamic": is_dynamic,
        "total_rank": _fmt(total_rank),
        "adapter_rows": adapter_rows,
        "tiers": tiers,
        "private_tiers": private_tiers,
        "health": _health_context(health),
        "training": _training_context(summary),
        "evaluation": _evaluation_context(results),
    }
    return _assemble(ADAPTER_CARD_TEMPLATE, template, card_data, context, "adapter")


# ----- writing -------------------------------------------------------------------------------------------


def render_card(folder: str | os.PathLike, **options) -> ModelCard:
    """The model or adapter card of `folder`, whichever it holds."""
    if folder_kind(folder) == "model":
        options.pop("health", None)
        return render_model_card(folder, **options)
    return render_adapter_card(folder, **options)


def write_card(folder: str | os.PathLike, **options) -> Path:
    """Render the card of `folder` and write it atomically to `folder/README.md`; returns the path."""
    card = render_card(folder, **options)
    path = Path(folder) / CARD_NAME
    atomic_write_text(str(path), str(card))
    return path


def has_training_metadata(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / RUN_SUMMARY_NAME).is_file() or (folder / EVAL_RESULTS_NAME).is_file()


# ----- save hooks ----------------------------------------------------------------------------------------
# Both write the card only when training metadata is available: run_summary.json / eval_results.json in the
# folder, or card options set on the model as `model.hub_card_metadata = {"license": ..., ...}`.


def model_card_save_hook(model, save_directory) -> None:
    options = getattr(model, "hub_card_metadata", None)
    if options is None and not has_training_metadata(save_directory):
        return
    write_card(save_directory, **(options or {}))


def adapter_card_save_hook(config, save_directory, tuner, adapter_name) -> None:
    options = getattr(tuner, "hub_card_metadata", None) if tuner is not None else None
    if options is None and not has_training_metadata(save_directory):
        return
    options = dict(options or {})
    if tuner is not None and adapter_name is not None:
        health = _json_safe(tuner.health(adapter_name))
        atomic_write_text(os.path.join(save_directory, ADAPTER_HEALTH_NAME),
                          json.dumps(health, indent=1, sort_keys=True, allow_nan=False) + "\n")
        options["health"] = health
    write_card(save_directory, **options)
