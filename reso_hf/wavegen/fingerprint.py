"""What a generation depends on: the components of a model, each with a hash (the WaveGen cache's provenance).

A model is split into components, named as follows; each gets a blake2b hash of everything in it that can change
what `generate` returns:

    runtime                      torch and transformers versions, device type, attention implementation
    base                         class, config and every parameter and buffer outside the adapters
    state                        ResoLLM only, when non-empty: goals and recalled memories (attention prefix slots)
                                 and bound concepts
    adapter:NAME                 a PEFT adapter other than DynamicLoRA (e.g. LoRA), when active and not disabled:
                                 its tensors, its per-module settings (scaling, r, alpha, ...) and merge state
    adapter:NAME/tier:TIER       one tier of an active DynamicLoRA adapter (SPEC §5.1), when its effective scale
                                 is non-zero on at least one module: per module the scale columns s_t and, where
                                 they are non-zero, the tier's factors A_t, B_t (and the merge state)

A component that does not act is not a component at all: a disabled adapter (`with model.disable_adapter()`), an
adapter that is not active, a DynamicLoRA tier switched off (weight 0: `AdapterComposite.use_tiers`,
`set_tier_weights`) contribute exactly nothing to the forward pass (their scale columns multiply by 0), so their
weights are not hashed and changing them cannot make a cached generation stale.

Unlike the snapshot provenance of SPEC §5.8 (which leaves out session-scoped tiers because it names what may be
shared), every tier that acts is a dependency here: the context tier changes outputs as much as any other.

Cost: adapter tensors are small and hashed on every call. The base model's parameters are hashed once and then
only when one of them changes, as seen by its version counter (every in-place write through autograd-visible
operations: optimizer steps, `copy_`, `load_state_dict`) or its storage (a new tensor assigned). Writes through
`tensor.data` bypass version counters; PEFT's merge does such writes, so the merge state is hashed with the adapter
and a change of it re-hashes the whole base. Call `ComponentHasher.forget()` after writing base weights through
`.data` yourself, or build the hasher with `rehash_base=True` to hash the base on every call.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch

from ..dynamic_lora.export import canonical_json, tensor_digest
from ..dynamic_lora.layer import DynamicLoraLayer

RUNTIME, BASE, STATE = "runtime", "base", "state"
ADAPTER_PREFIX = "adapter:"
TIER_SEPARATOR = "/tier:"


def adapter_component(adapter: str) -> str:
    return f"{ADAPTER_PREFIX}{adapter}"


def tier_component(adapter: str, tier: str) -> str:
    return f"{ADAPTER_PREFIX}{adapter}{TIER_SEPARATOR}{tier}"


def tier_of(component: str) -> Optional[str]:
    """The tier of a tier component ("adapter:default/tier:context" -> "context"), None for any other component."""
    return component.split(TIER_SEPARATOR, 1)[1] if TIER_SEPARATOR in component else None


def _hash(value) -> str:
    return hashlib.blake2b(canonical_json(value).encode(), digest_size=16).hexdigest()


def _describe(value):
    """A JSON-able description of a tuner layer's per-adapter setting (tensor -> digest, module -> its state)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_digest(value)}
    if isinstance(value, torch.nn.Module):
        return {"module": type(value).__name__, "repr": repr(value),
                "state": {k: tensor_digest(v) for k, v in sorted(value.state_dict().items())}}
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"type": type(value).__name__, "repr": repr(value)}


def _tuner_layers(model) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def _inner_model(model):
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _adapter_prefixes(layers) -> tuple[str, ...]:
    """Parameter/buffer name prefixes that belong to adapters (hashed with their adapter, not with the base)."""
    prefixes = []
    for name, module in layers:
        for attribute in (*module.adapter_layer_names, *module.other_param_names):
            prefixes.append(f"{name}.{attribute}." if name else f"{attribute}.")
    return tuple(prefixes)


def _merge_signature(layers) -> tuple:
    return tuple((name, tuple(module.merged_adapters)) for name, module in layers)


class ComponentHasher:
    """Hashes the components of a model (see the module docstring); keeps the base digests between calls."""

    def __init__(self, rehash_base: bool = False):
        self.rehash_base = bool(rehash_base)
        self._base_digests: dict[str, tuple[tuple, str]] = {}
        self._merge_signature: Optional[tuple] = None

    def forget(self) -> None:
        """Drop the remembered base digests: the next call hashes every base tensor again."""
        self._base_digests = {}
        self._merge_signature = None

    # ----- the components -----------------------------------------------------------------------------------
    def components(self, model, extra_adapters: tuple[str, ...] = ()) -> dict[str, str]:
        """Component name -> hash for every component that acts on `model.generate` now.

        `extra_adapters`: adapters that act although they are not active (PEFT's mixed batches, `adapter_names=`).
        """
        inner = _inner_model(model)
        layers = _tuner_layers(inner)
        result = {RUNTIME: self._runtime(model), BASE: self._base(inner, layers)}
        state = self._state(model)
        if state is not None:
            result[STATE] = state
        result.update(self._adapters(layers, extra_adapters))
        return dict(sorted(result.items()))

    @staticmethod
    def _runtime(model) -> str:
        import transformers

        inner = _inner_model(model)
        parameter = next(inner.parameters(), None)
        device = parameter.device.type if parameter is not None else "cpu"
        return _hash({"torch": torch.__version__, "transformers": transformers.__version__, "device": device,
                      "attn_implementation": getattr(inner.config, "_attn_implementation", None)})

    def _base(self, inner, layers) -> str:
        signature = _merge_signature(layers)
        if self.rehash_base or signature != self._merge_signature:
            self._base_digests = {}
            self._merge_signature = signature
        skip = _adapter_prefixes(layers)
        digests = {}
        remembered = {}
        named = list(inner.named_parameters()) + list(inner.named_buffers())
        for name, tensor in named:
            if name.startswith(skip):
                continue
            # under PEFT the base weight of an adapted module sits in `.base_layer`: same name as without adapter,
            # so a model with its adapters disabled shares its entries with the plain model
            name = name.replace(".base_layer.", ".")
            # identity of the tensor and of its data: a change of any of them means new values
            marker = (id(tensor), tensor.data_ptr(), tensor._version, tuple(tensor.shape), str(tensor.dtype))
            cached = self._base_digests.get(name)
            digest = cached[1] if cached is not None and cached[0] == marker else tensor_digest(tensor)
            remembered[name] = (marker, digest)
            digests[name] = digest
        self._base_digests = remembered
        config = inner.config.to_dict()
        config.pop("transformers_version", None)
        return _hash({"class": type(inner).__name__, "config": config, "tensors": digests})

    @staticmethod
    def _state(model) -> Optional[str]:
        inner = _inner_model(model)
        reso_state = getattr(inner, "reso_state", None)
        if reso_state is None:
            return None
        prefix = reso_state.prefix_vectors()
        bound = inner._bound_concepts() if hasattr(inner, "_bound_concepts") else None
        if prefix is None and bound is None:
            return None
        return _hash({"prefix": None if prefix is None else tensor_digest(prefix),
                      "bound": None if bound is None else [tensor_digest(t) for t in bound]})

    @staticmethod
    def _adapters(layers, extra_adapters: tuple[str, ...]) -> dict[str, str]:
        parts: dict[str, dict] = {}
        for name, module in layers:
            if module.disable_adapters:
                continue
            acting = list(dict.fromkeys([*module.active_adapters, *extra_adapters]))
            for adapter in acting:
                merged = adapter in module.merged_adapters
                if isinstance(module, DynamicLoraLayer):
                    if adapter not in module.dynamic_lora_A:
                        continue
                    scale = module.dynamic_lora_scale[adapter]
                    for tier, columns in module.tier_slices(adapter).items():
                        tier_scale = scale[columns]
                        if not bool(torch.any(tier_scale != 0)):
                            continue  # a zero-scaled tier adds exactly 0 here: its factors do not matter
                        entry = {"scale": tensor_digest(tier_scale), "merged": merged,
                                 "A": tensor_digest(module.dynamic_lora_A[adapter][tier]),
                                 "B": tensor_digest(module.dynamic_lora_B[adapter][tier])}
                        parts.setdefault(tier_component(adapter, tier), {})[name] = entry
                    continue
                settings = {}
                for attribute in (*module.adapter_layer_names, *module.other_param_names):
                    container = getattr(module, attribute, None)
                    if container is not None and hasattr(container, "keys") and adapter in container.keys():
                        settings[attribute] = _describe(container[adapter])
                if settings:
                    settings["merged"] = merged
                    parts.setdefault(adapter_component(adapter), {})[name] = settings
        return {component: _hash(modules) for component, modules in parts.items()}
