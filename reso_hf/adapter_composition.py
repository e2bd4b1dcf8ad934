"""Composites: one base model with several adapters active together, each with a weight changeable at run time.

A composite is a PeftModel (PEFT LoRA or DynamicLoRA) plus, per adapter, a weight, an on/off switch, an optional set
of decoder layers it acts on and (DynamicLoRA) per-tier weights. Nothing is merged into the base weights: the
adapters are activated together with PEFT's `set_adapter([...])` and every adapter's scaling on every module is set
to its default scaling times its effective weight (LoRA: `LoraLayer.set_scale`; DynamicLoRA: the per-column scale
s_t of each tier), so the composite computes

    y = W0 x + sum_{adapters i on} w_i * m_i(layer) * sum_t u_{i,t} s_{i,t} B_{i,t} A_{i,t} x

with w_i the adapter weight, m_i(layer) in {0, 1} the layer switch and u_{i,t} the tier weights (1 for LoRA).
Changing a weight costs one pass over the adapted modules and no matrix product.

Topologies (the `topology` field of the manifest):
  "weighted"   the weights as set;
  "sequenced"  `schedule` = a list of {adapter: weight} per turn; `at_turn(i)` applies turn i's weights (the last one
               for later turns);
  "routed"     `AdapterRouter`: per adapter a centroid of prompt embeddings (mean of the base model's input token
               embeddings over the prompt); a prompt gets weights from the cosine similarities to the centroids:
               "top1" (the closest adapter alone, weight 1) or "softmax" (softmax(similarity / temperature));
  "ensemble"   `ensemble_logprobs`: log of the mixture sum_i w_i p_i / sum_i w_i of the next-token distributions p_i
               of each adapter alone (weight 1, all layers); `ensemble_generate` decodes greedily from it.

Saved as one folder: `composite.json` (the manifest), the adapters in PEFT's own layout (`save_pretrained` with
`selected_adapters`: the adapter "default" at the root, others in sub-folders named after them) and, for a routed
composite, `router.safetensors` with the centroids.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from typing import Optional, Sequence

import torch

from .adapter_algebra import adapter_kind, adapter_parts
from .dynamic_lora.serialization import atomic_save_safetensors, atomic_write_json, load_safetensors

MANIFEST_NAME = "composite.json"
ROUTER_NAME = "router.safetensors"
MANIFEST_FORMAT = "reso_hf.adapter_composite"
MANIFEST_VERSION = 1
TOPOLOGIES = ("weighted", "sequenced", "routed", "ensemble")
ROUTING_MODES = ("top1", "softmax")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _finite(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}.")
    return float(value)


def decoder_layer_index(module_name: str) -> Optional[int]:
    """The decoder layer a module belongs to ("model.layers.3.self_attn.q_proj" -> 3), None outside the layers."""
    match = _LAYER_INDEX.search(f".{module_name}.")
    return int(match.group(1)) if match else None


class AdapterComposite:
    """A PeftModel whose adapters act together with runtime weights (see the module docstring).

    Example:

        ```py
        >>> composite = AdapterComposite(peft_model, {"spanish": 1.0, "style": 0.5})
        >>> composite.set_weight("style", 0.2)          # takes effect on the next forward, nothing re-merged
        >>> composite.set_layers("style", range(0, 12)) # only decoder layers 0..11
        >>> composite.save_pretrained("my_composite")
        ```
    """

    def __init__(self, model, weights: Optional[dict[str, float]] = None, topology: str = "weighted"):
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise ValueError(f"model must be a peft.PeftModel holding the adapters, got {type(model).__name__}.")
        self.model = model
        names = list(model.peft_config) if weights is None else list(weights)
        if not names:
            raise ValueError("a composite needs at least one adapter.")
        kinds = {adapter_kind(model, name) for name in names}  # also checks that every adapter exists
        if len(kinds) != 1:
            raise ValueError(f"the adapters of a composite must all be LORA or all DYNAMIC_LORA, got {sorted(kinds)}.")
        self.kind = kinds.pop()
        self.weights = {name: 1.0 for name in names}
        self.enabled = {name: True for name in names}
        self.layers: dict[str, Optional[set[int]]] = {name: None for name in names}
        self.tier_weights: dict[str, dict[str, float]] = {}
        self.schedule: list[dict[str, float]] = []
        self.router: Optional[AdapterRouter] = None
        self.topology = "weighted"
        self.set_topology(topology)
        for name, weight in (weights or {}).items():
            self.weights[name] = _finite(weight, f"weights[{name!r}]")
        self.apply()

    # ----- settings (each one takes effect at once) -----------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self.weights)

    def _check_adapter(self, name: str) -> None:
        if name not in self.weights:
            raise ValueError(f"adapter {name!r} is not in the composite; adapters: {self.adapters}.")

    def set_topology(self, topology: str) -> None:
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {list(TOPOLOGIES)}, got {topology!r}.")
        self.topology = topology

    def set_weight(self, name: str, weight: float) -> None:
        self._check_adapter(name)
        self.weights[name] = _finite(weight, "weight")
        self.apply()

    def set_weights(self, weights: dict[str, float]) -> None:
        for name, weight in weights.items():
            self._check_adapter(name)
            self.weights[name] = _finite(weight, f"weights[{name!r}]")
        self.apply()

    def enable(self, name: str) -> None:
        self._check_adapter(name)
        self.enabled[name] = True
        self.apply()

    def disable(self, name: str) -> None:
        """Switch an adapter off (its weight is kept for when it is switched on again)."""
        self._check_adapter(name)
        self.enabled[name] = False
        self.apply()

    def set_layers(self, name: str, layers: Optional[Sequence[int]]) -> None:
        """Let adapter `name` act only in these decoder layers (None: all). Modules outside the decoder layers
        (e.g. lm_head) are not switched."""
        self._check_adapter(name)
        if layers is not None:
            layers = set(layers)
            bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad:
                raise ValueError(f"layers must be non-negative decoder layer indices, got {sorted(map(str, bad))}.")
        self.layers[name] = layers
        self.apply()

    def set_tier_weights(self, name: str, tier_weights: dict[str, float]) -> None:
        """DynamicLoRA: weight of each tier of adapter `name` (tiers not named keep weight 1)."""
        self._check_adapter(name)
        if self.kind != "DYNAMIC_LORA":
            raise ValueError("tier weights apply to DYNAMIC_LORA adapters; this composite holds LORA adapters.")
        tiers = self.model.peft_config[name].tiers
        unknown = [t for t in tier_weights if t not in tiers]
        if unknown:
            raise ValueError(f"tiers {unknown} are not tiers of adapter {name!r}; allowed: {list(tiers)}.")
        self.tier_weights[name] = {t: _finite(w, f"tier_weights[{t!r}]") for t, w in tier_weights.items()}
        self.apply()

    def use_tiers(self, name: str, tiers: Sequence[str]) -> None:
        """DynamicLoRA: run adapter `name` with this subset of its tiers (the others get weight 0)."""
        if self.kind != "DYNAMIC_LORA":
            raise ValueError("tier subsets apply to DYNAMIC_LORA adapters; this composite holds LORA adapters.")
        self._check_adapter(name)
        all_tiers = self.model.peft_config[name].tiers
        unknown = [t for t in tiers if t not in all_tiers]
        if unknown:
            raise ValueError(f"tiers {unknown} are not tiers of adapter {name!r}; allowed: {list(all_tiers)}.")
        self.set_tier_weights(name, {t: (1.0 if t in tiers else 0.0) for t in all_tiers})

    def set_schedule(self, schedule: Sequence[dict[str, float]]) -> None:
        """Sequenced topology: turn i uses schedule[i] (adapters not named keep their weight)."""
        checked = []
        for turn, weights in enumerate(schedule):
            for name, weight in weights.items():
                self._check_adapter(name)
                _finite(weight, f"schedule[{turn}][{name!r}]")
            checked.append({n: float(w) for n, w in weights.items()})
        if not checked:
            raise ValueError("schedule must hold at least one turn.")
        self.schedule = checked
        self.topology = "sequenced"

    def at_turn(self, turn: int) -> dict[str, float]:
        """Apply the scheduled weights of `turn` (the last scheduled turn for later ones); returns all weights."""
        if not self.schedule:
            raise ValueError("no schedule: call set_schedule first.")
        if isinstance(turn, bool) or not isinstance(turn, int) or turn < 0:
            raise ValueError(f"turn must be a non-negative int, got {turn!r}.")
        self.set_weights(self.schedule[min(turn, len(self.schedule) - 1)])
        return dict(self.weights)

    # ----- applying the settings to the layers ----------------------------------------------------------------
    def effective_scale(self, name: str, module_name: str) -> float:
        """w_i * m_i(layer): the factor on adapter `name`'s default scaling on that module (0 when switched off)."""
        if not self.enabled[name]:
            return 0.0
        allowed = self.layers[name]
        index = decoder_layer_index(module_name)
        if allowed is not None and index is not None and index not in allowed:
            return 0.0
        return self.weights[name]

    @torch.no_grad()
    def _write_scales(self, scales: dict[str, dict[str, float]], tier_weights: dict[str, dict[str, float]]) -> None:
        """scales: adapter -> module -> factor on its default scaling."""
        for name, per_module in scales.items():
            for module_name, parts in adapter_parts(self.model, name).items():
                factor = per_module[module_name]
                layer = parts[0].layer
                if self.kind == "LORA":
                    layer.set_scale(name, factor)
                    continue
                weights = tier_weights.get(name, {})
                column_scales = [
                    torch.full((layer.tier_ranks[name][t],), factor * weights.get(t, 1.0) * layer.tier_scalings[name][t])
                    for t in layer.tier_names[name]
                ]
                current = layer.dynamic_lora_scale[name]
                layer.dynamic_lora_scale[name] = torch.cat(column_scales).to(device=current.device, dtype=current.dtype)

    def apply(self) -> None:
        """Activate every adapter of the composite (PEFT `set_adapter([...])`) with its effective scales."""
        scales = {
            name: {module: self.effective_scale(name, module) for module in adapter_parts(self.model, name)}
            for name in self.adapters
        }
        self._write_scales(scales, self.tier_weights)
        self.model.base_model.set_adapter(self.adapters, inference_mode=True)

    @contextmanager
    def solo(self, name: str):
        """Only adapter `name`, at weight 1 on every layer with all its tiers, inside the block (ensemble members)."""
        self._check_adapter(name)
        self._write_scales({name: {m: 1.0 for m in adapter_parts(self.model, name)}}, {})
        self.model.base_model.set_adapter([name], inference_mode=True)
        try:
            yield self.model
        finally:
            self.apply()

    def reset_scales(self) -> None:
        """Give every adapter its default scaling back (weight 1, all layers and tiers): the model as PEFT made it."""
        self._write_scales({n: {m: 1.0 for m in adapter_parts(self.model, n)} for n in self.adapters}, {})

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ----- ensemble --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def ensemble_logprobs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log( sum_i w_i softmax(logits_i) / sum_i w_i ) over the enabled adapters with w_i > 0: (batch, seq, vocab)."""
        members = [(n, self.weights[n]) for n in self.adapters if self.enabled[n] and self.weights[n] > 0]
        if not members:
            raise ValueError("an ensemble needs at least one enabled adapter with a positive weight.")
        total = sum(w for _, w in members)
        mixed = None
        for name, weight in members:
            with self.solo(name):
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            part = torch.log_softmax(logits, dim=-1) + math.log(weight / total)
            mixed = part if mixed is None else torch.logaddexp(mixed, part)
        return mixed

    @torch.no_grad()
    def ensemble_generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                          eos_token_id: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding from the ensemble's mixture (no KV cache: every step reruns every member)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}.")
        sequence = input_ids
        for _ in range(max_new_tokens):
            next_token = self.ensemble_logprobs(sequence)[:, -1].argmax(dim=-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
            if eos_token_id is not None and bool((next_token == eos_token_id).all()):
                break
        return sequence

    # ----- persistence -----------------------------------------------------------------------------------------
    def manifest(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "kind": self.kind,
            "topology": self.topology,
            "adapters": [
                {
                    "name": name,
                    "folder": "." if name == "default" else name,
                    "weight": self.weights[name],
                    "enabled": self.enabled[name],
                    "layers": None if self.layers[name] is None else sorted(self.layers[name]),
                    "tier_weights": self.tier_weights.get(name),
                }
                for name in self.adapters
            ],
            "schedule": self.schedule,
            "router": None if self.router is None else self.router.settings(),
        }

    def save_pretrained(self, save_directory: str) -> None:
        """The adapters in PEFT's layout (their default scaling), the manifest, the router's centroids."""
        os.makedirs(save_directory, exist_ok=True)
        self.reset_scales()  # PEFT saves factors, not scalings, but keep the saved model state the default one
        try:
            self.model.save_pretrained(save_directory, selected_adapters=self.adapters)
        finally:
            self.apply()
        if self.router is not None:
            atomic_save_safetensors(os.path.join(save_directory, ROUTER_NAME), self.router.state())
        atomic_write_json(os.path.join(save_directory, MANIFEST_NAME), self.manifest())

    @classmethod
    def from_pretrained(cls, base_model, directory: str) -> "AdapterComposite":
        """Load a composite saved by `save_pretrained` onto `base_model` (a transformers model)."""
        from peft import PeftModel

        path = os.path.join(directory, MANIFEST_NAME)
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"{path} is not a composite manifest of version {MANIFEST_VERSION} (format {MANIFEST_FORMAT!r}); got "
                f"format {manifest.get('format')!r}, version {manifest.get('version')!r}."
            )
        entries = manifest["adapters"]
        model = None
        for entry in entries:
            folder = os.path.normpath(os.path.join(directory, entry["folder"]))
            if model is None:
                model = PeftModel.from_pretrained(base_model, folder, adapter_name=entry["name"])
            else:
                model.load_adapter(folder, adapter_name=entry["name"])
        model.eval()
        composite = cls(model, {e["name"]: e["weight"] for e in entries}, topology=manifest["topology"])
        for entry in entries:
            composite.enabled[entry["name"]] = bool(entry["enabled"])
            composite.layers[entry["name"]] = None if entry["layers"] is None else set(entry["layers"])
            if entry["tier_weights"]:
                composite.tier_weights[entry["name"]] = dict(entry["tier_weights"])
        composite.schedule = [dict(turn) for turn in manifest["schedule"]]
        if manifest["router"] is not None:
            composite.router = AdapterRouter.from_state(composite, manifest["router"],
                                                        load_safetensors(os.path.join(directory, ROUTER_NAME)))
        composite.apply()
        return composite


@torch.no_grad()
def prompt_embedding(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(batch, hidden): the mean of `model`'s input token embeddings over each row's unmasked tokens, minus the mean of
    the whole embedding matrix (trained embeddings share a large common direction that would make every cosine
    close to 1). The cheap prompt signal of routing and of conversation memory retrieval: no forward pass."""
    table = model.get_input_embeddings()
    embeddings = table(input_ids).float()
    common = table.weight.float().mean(dim=0)
    if attention_mask is None:
        return embeddings.mean(dim=1) - common
    mask = attention_mask.unsqueeze(-1).float()
    return (embeddings * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0) - common


class AdapterRouter:
    """Routes a prompt to the composite's adapters by the similarity of its embedding to each adapter's centroid.

    The embedding of a prompt is the mean of the base model's input token embeddings over its (unmasked) tokens,
    minus the mean of the whole embedding matrix (trained embeddings share a large common direction that would make
    every cosine close to 1): no forward pass, so routing costs one embedding lookup.
    """

    def __init__(self, composite: AdapterComposite, mode: str = "top1", temperature: float = 0.05):
        if mode not in ROUTING_MODES:
            raise ValueError(f"mode must be one of {list(ROUTING_MODES)}, got {mode!r}.")
        if _finite(temperature, "temperature") <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
        self.composite = composite
        self.mode = mode
        self.temperature = float(temperature)
        self.centroids: dict[str, torch.Tensor] = {}
        composite.router = self
        composite.set_topology("routed")

    def embed(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, hidden) mean input embedding of each row (`prompt_embedding`)."""
        return prompt_embedding(self.composite.model, input_ids, attention_mask)

    def fit(self, name: str, prompts: Sequence[torch.Tensor]) -> None:
        """The centroid of adapter `name` = mean embedding of example prompts of its task (1-D token id tensors)."""
        self.composite._check_adapter(name)
        if not prompts:
            raise ValueError(f"fit needs at least one example prompt for adapter {name!r}.")
        self.centroids[name] = torch.stack([self.embed(p.reshape(1, -1))[0] for p in prompts]).mean(dim=0)

    def weights_for(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, adapters with a centroid) routing weights, in the order of `self.centroids`."""
        if not self.centroids:
            raise ValueError("the router has no centroids: call fit(adapter, prompts) for each adapter first.")
        prompts = torch.nn.functional.normalize(self.embed(input_ids, attention_mask), dim=-1)
        centroids = torch.nn.functional.normalize(torch.stack(list(self.centroids.values())), dim=-1)
        similarity = prompts @ centroids.T
        if self.mode == "top1":
            return torch.nn.functional.one_hot(similarity.argmax(dim=-1), len(self.centroids)).float()
        return torch.softmax(similarity / self.temperature, dim=-1)

    def route(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> dict[str, float]:
        """Set the composite's weights for one prompt (batch of 1) and return them."""
        if input_ids.shape[0] != 1:
            raise ValueError(f"route sets the weights of one prompt: input_ids must have batch size 1, got "
                             f"{input_ids.shape[0]} (use forward_routed for a batch).")
        weights = dict(zip(self.centroids, self.weights_for(input_ids, attention_mask)[0].tolist()))
        self.composite.set_weights(weights)
        return weights

    @torch.no_grad()
    def forward_routed(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        """top1: one forward with PEFT's mixed-adapter batch (`adapter_names=` per row, each at weight 1).
        softmax: one forward per row with that row's weights. Returns the logits (batch, seq, vocab)."""
        if self.mode == "top1":
            names = list(self.centroids)
            chosen = [names[i] for i in self.weights_for(input_ids, attention_mask).argmax(dim=-1).tolist()]
            self.composite.reset_scales()
            self.composite.model.base_model.set_adapter(self.composite.adapters, inference_mode=True)
            try:
                return self.composite.model(input_ids=input_ids, attention_mask=attention_mask,
                                            adapter_names=chosen).logits
            finally:
                self.composite.apply()
        rows = []
        for row in range(input_ids.shape[0]):
            mask = None if attention_mask is None else attention_mask[row:row + 1]
            self.route(input_ids[row:row + 1], mask)
            rows.append(self.composite.model(input_ids=input_ids[row:row + 1], attention_mask=mask).logits)
        return torch.cat(rows, dim=0)

    def settings(self) -> dict:
        return {"mode": self.mode, "temperature": self.temperature, "adapters": list(self.centroids)}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"centroid.{name}": c.contiguous() for name, c in self.centroids.items()}

    @classmethod
    def from_state(cls, composite: AdapterComposite, settings: dict, tensors: dict[str, torch.Tensor]) -> "AdapterRouter":
        router = cls(composite, mode=settings["mode"], temperature=settings["temperature"])
        router.centroids = {name: tensors[f"centroid.{name}"] for name in settings["adapters"]}
        return router
