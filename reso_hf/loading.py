"""Loading a causal LM and its tokenizer from what a user names: one place for every command.

A model source is one of

- a Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``);
- a local folder written by ``save_pretrained`` (it holds ``config.json``);
- a ``.gguf`` file, or a folder / Hub repo together with ``gguf_file=NAME``; its weights are unpacked
  to ordinary dense tensors, so the model trains and saves like any other;
- a PEFT adapter folder (it holds ``adapter_config.json``, LoRA or DynamicLoRA) whose
  ``base_model_name_or_path`` is itself one of the above.

`resolve_model_source` checks a source without loading anything, so a command can reject a bad path at
once, before it prepares data; `load_causal_lm` and `load_tokenizer` load what it resolved.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

GGUF_MAGIC = b"GGUF"
ADAPTER_CONFIG_NAME = "adapter_config.json"
MODEL_CONFIG_NAME = "config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SOURCE_KINDS = "a Hub id, a model folder (save_pretrained), a .gguf file or a PEFT adapter folder"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, checked by `resolve_model_source`.

    location: what `from_pretrained` receives (a folder or a Hub id; for an adapter, the adapter folder).
    gguf_file: the GGUF file name inside `location`, when the weights are a GGUF file.
    base: for a PEFT adapter folder, the source of its base model.
    """

    location: str
    gguf_file: str | None = None
    base: ModelSource | None = None

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    @property
    def name(self) -> str:
        """The path or id that names this model (the GGUF file itself for a GGUF)."""
        return os.path.join(self.location, self.gguf_file) if self.gguf_file else self.location


def _check_gguf_file(path: str, field: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{field}: GGUF file {path!r} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{field}: {path!r} is not a GGUF file (it does not start with the bytes {GGUF_MAGIC!r})")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"{field}: reading the GGUF file {path!r} needs the gguf package: "
                          "pip install 'reso-hf[gguf]' (or pip install gguf)")


def _gguf_source(path: str, field: str) -> ModelSource:
    _check_gguf_file(path, field)
    directory, name = os.path.split(os.path.abspath(path))
    return ModelSource(directory, gguf_file=name)


def _adapter_source(folder: str, field: str) -> ModelSource:
    config_path = os.path.join(folder, ADAPTER_CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as handle:
            adapter_config = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{field}: {config_path} is not valid JSON ({error})") from error
    base = adapter_config.get("base_model_name_or_path") if isinstance(adapter_config, dict) else None
    if not isinstance(base, str) or not base:
        raise ValueError(f"{field}: {config_path} names no base model (base_model_name_or_path is {base!r}); "
                         f"set it to {SOURCE_KINDS}")
    base_source = resolve_model_source(base, field=f"{config_path} base_model_name_or_path")
    return ModelSource(os.path.abspath(folder), base=base_source)


def resolve_model_source(source: str | None, gguf_file: str | None = None, field: str = "model") -> ModelSource:
    """Check `source` (and `gguf_file`, a file name inside it) without loading it; `field` names the argument
    in error messages. Local paths become absolute, so that what an adapter records as its base model
    reloads from any working directory."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not source:
        raise ValueError(f"{field} is required: {SOURCE_KINDS}")
    if source.lower().endswith(".gguf"):
        if gguf_file and gguf_file != os.path.basename(source):
            raise ValueError(f"{field} is the GGUF file {source!r} and gguf_file={gguf_file!r} names another: "
                             "pass one of them")
        return _gguf_source(source, field)
    if os.path.isdir(source):
        if gguf_file:
            return _gguf_source(os.path.join(source, gguf_file), f"{field} + gguf_file")
        if os.path.isfile(os.path.join(source, ADAPTER_CONFIG_NAME)):
            return _adapter_source(source, field)
        if os.path.isfile(os.path.join(source, MODEL_CONFIG_NAME)):
            return ModelSource(os.path.abspath(source))
        ggufs = sorted(name for name in os.listdir(source) if name.lower().endswith(".gguf"))
        hint = f"; it holds {ggufs}: pass the file's path" if ggufs else ""
        raise FileNotFoundError(f"{field}: folder {source!r} holds neither {MODEL_CONFIG_NAME} (a model saved with "
                                f"save_pretrained) nor {ADAPTER_CONFIG_NAME} (a PEFT adapter){hint}")
    if os.path.exists(source):
        raise ValueError(f"{field}: {source!r} is a file; expected {SOURCE_KINDS}")
    try:
        validate_repo_id(source)
    except HFValidationError as error:
        raise FileNotFoundError(f"{field}: {source!r} does not exist, and it is not a Hub id either "
                                "('name' or 'namespace/name')") from error
    return ModelSource(source, gguf_file=gguf_file)


def _as_source(source: str | ModelSource) -> ModelSource:
    return source if isinstance(source, ModelSource) else resolve_model_source(source)


def load_causal_lm(source: str | ModelSource, *, dtype=None, trust_remote_code: bool = False):
    """The model of `source` (see the module docstring), in eval mode. `dtype`: as for `from_pretrained`
    (None: its default). An adapter folder loads onto its base model as a `PeftModel` for inference."""
    from transformers import AutoModelForCausalLM, GgufConfig

    from .registration import register_reso_llm

    source = _as_source(source)
    register_reso_llm()  # a ResoLLM folder loads by its model_type
    if source.is_adapter:
        from peft import PeftModel

        from .dynamic_lora import register_dynamic_lora

        register_dynamic_lora()  # PEFT has no auto_map: DYNAMIC_LORA must be registered before loading
        base = load_causal_lm(source.base, dtype=dtype, trust_remote_code=trust_remote_code)
        return PeftModel.from_pretrained(base, source.location).eval()
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if source.gguf_file:
        # transformers loads a GGUF through its GGUF quantizer, which leaves the model marked quantized with a
        # method that "does not support training" (Trainer refuses it) nor saving, even where every weight was
        # unpacked to a plain float tensor. `dequantize=True` asks for that dense model and drops the marks.
        kwargs.update(gguf_file=source.gguf_file, quantization_config=GgufConfig(dequantize=True))
    model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    if source.gguf_file:
        # from_pretrained records the folder; an adapter trained on this model must name the file to reload.
        model.name_or_path = model.config.name_or_path = source.name
    return model.eval()


def load_tokenizer(source: str | ModelSource, trust_remote_code: bool = False):
    """The tokenizer of `source`: an adapter folder's own when it saved one, else its base model's."""
    from transformers import AutoTokenizer

    from .registration import register_reso_llm

    source = _as_source(source)
    register_reso_llm()
    if source.is_adapter and not os.path.isfile(os.path.join(source.location, TOKENIZER_CONFIG_NAME)):
        return load_tokenizer(source.base, trust_remote_code=trust_remote_code)
    kwargs = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    return AutoTokenizer.from_pretrained(source.location, **kwargs)
