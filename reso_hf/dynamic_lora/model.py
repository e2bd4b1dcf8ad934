"""The DynamicLoRA tuner: injection into any transformers model, dynamics, persistence, export."""

from __future__ import annotations

import functools
import json
import os
import re
from contextlib import ExitStack, contextmanager
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper

from . import combination
from .config import (
    AUDIT_LOG_NAME,
    DYNAMICS_STATE_JSON_NAME,
    DYNAMICS_STATE_TENSORS_NAME,
    DYNAMICS_STATE_TIERS_METADATA,
    PRE_ISSUE_20_RANKS,
    DynamicLoraConfig,
)
from .dynamics import STATE_FORMAT, AdapterDynamics, factor_key
from .export import DynamicLoraSnapshot, export_lora, provenance_hash
from .layer import BASE_ADAPTER_NAME, DynamicLoraLayer, create_dynamic_lora_module
from .serialization import atomic_save_safetensors, atomic_write_json, atomic_write_text, load_safetensors
from .sharding import whole_factors

_TIER_KEY = re.compile(r"\.dynamic_lora_([AB])\.(?P<adapter>[^.]+)\.(?P<tier>[^.]+)$")
_CHECKPOINT_TIER_KEY = re.compile(r"^(?P<module>.+)\.dynamic_lora_(?P<which>[AB])\.(?P<tier>[^.]+)$")


def _inject_adapter_names(module, args, kwargs, adapter_names):
    # forward pre-hook of a mixed-adapter batch: the layer receives the per-row adapter names as a keyword
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class DynamicLoraModel(BaseTuner):
    """Creates a DynamicLoRA model (SPEC §5) from a transformers model; use through `peft.get_peft_model`.

    Example:

        ```py
        >>> import reso_hf
        >>> from peft import get_peft_model
        >>> config = reso_hf.DynamicLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
        >>> model = get_peft_model(base_model, config)
        >>> # after each optimizer.step(), before zero_grad():
        >>> metrics = model.base_model.dynamic_step(optimizer)
        ```
    """

    prefix: str = "dynamic_lora_"
    tuner_layer_cls = DynamicLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ----- injection -----------------------------------------------------------------------------------
    def _create_and_replace(
        self,
        peft_config: DynamicLoraConfig,
        adapter_name: str,
        target: torch.nn.Module,
        target_name: str,
        parent: torch.nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        if parameter_name is not None:
            raise ValueError("DynamicLoRA adapts modules, not parameters: target_parameters must be None.")
        if isinstance(target, DynamicLoraLayer):
            target.update_layer(adapter_name, peft_config)
        else:
            new_module = create_dynamic_lora_module(target, adapter_name, peft_config)
            if new_module.weight_is_transposed:
                peft_config.fan_in_fan_out = True
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: torch.nn.Module, config: DynamicLoraConfig, adapter_name: str) -> None:
        # Capture init = the freshly initialised factors now, before any optimizer step.
        self.dynamics(adapter_name)

    # ----- access ------------------------------------------------------------------------------------
    def adapter_layers(self, adapter_name: Optional[str] = None) -> dict[str, DynamicLoraLayer]:
        """Module name (relative to the transformers model) -> DynamicLoRA layer holding `adapter_name`."""
        adapter_name = adapter_name or self.active_adapters[0]
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, DynamicLoraLayer) and adapter_name in module.dynamic_lora_A
        }

    @property
    def dynamics_registry(self) -> dict[str, AdapterDynamics]:
        """Adapter name -> its dynamics state. The tuner owns it (not the config, which adapters and models may
        share); it is copied by `copy.deepcopy` and pickled with the model."""
        # kept in __dict__ rather than assigned, so nn.Module's attribute machinery never sees it
        return self.__dict__.setdefault("_dynamics_registry", {})

    def dynamics(self, adapter_name: Optional[str] = None) -> AdapterDynamics:
        adapter_name = adapter_name or self.active_adapters[0]
        registry = self.dynamics_registry
        if adapter_name not in registry:
            if adapter_name not in self.peft_config:
                raise KeyError(f"Unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}.")
            dynamics = AdapterDynamics(self.peft_config[adapter_name], adapter_name, self.adapter_layers(adapter_name))
            # a bound method, not a closure: deepcopy rebinds it to the copied tuner, and it pickles
            dynamics.provenance_fn = functools.partial(self.provenance, adapter_name)
            registry[adapter_name] = dynamics
        return registry[adapter_name]

    def tier_tensors(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """"<module>.<tier>.<A|B>" (`factor_key`) -> factor (live parameters, not copies)."""
        adapter_name = adapter_name or self.active_adapters[0]
        tensors = {}
        for name, layer in self.adapter_layers(adapter_name).items():
            for tier in layer.tier_names[adapter_name]:
                tensors[factor_key(name, tier, "A")] = layer.dynamic_lora_A[adapter_name][tier]
                tensors[factor_key(name, tier, "B")] = layer.dynamic_lora_B[adapter_name][tier]
        return tensors

    def select_tiers(self, adapter_name: str, tiers: Optional[list[str]], include_private: bool) -> list[str]:
        config = self.peft_config[adapter_name]
        if tiers is None:
            selected = [t for t in config.tiers if include_private or config.privacy_of(t) != "private"]
        else:
            unknown = [t for t in tiers if t not in config.tiers]
            if unknown:
                raise ValueError(f"tiers {unknown} are not tiers of adapter {adapter_name!r}; allowed: {config.tiers}.")
            private = [t for t in tiers if config.privacy_of(t) == "private"]
            if private and not include_private:
                raise ValueError(
                    f"tiers {private} are private (tier_privacy); pass include_private=True to write them."
                )
            selected = [t for t in config.tiers if t in tiers]
        if not selected:
            raise ValueError(f"No tier of adapter {adapter_name!r} is selected for writing.")
        return selected

    # ----- mixed-adapter batches, combination ------------------------------------------------------------
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """`adapter_names=[...]` in PeftModel.forward / generate: row i uses adapter adapter_names[i] only.

        The names reach every DynamicLoRA layer (and modules_to_save wrapper) through forward pre-hooks for the
        duration of the call. Under generate(), each row is repeated max(num_beams, num_return_sequences) times
        (as generate expands its inputs), except in the encoder of an encoder-decoder model.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names (str), got {adapter_names!r}.")
        if self.training:
            raise ValueError("adapter_names selects adapters per row at inference only: call model.eval() first.")
        known = set()
        for module in self.model.modules():
            if isinstance(module, DynamicLoraLayer):
                known |= set(module.dynamic_lora_A)
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER_NAME} - known)
        if unknown:
            raise ValueError(
                f"adapter_names holds unknown adapters {unknown}; allowed: {sorted(known) + [BASE_ADAPTER_NAME]}."
            )
        generation_config = kwargs.get("generation_config")
        copies = max(
            int(kwargs.get("num_beams") or getattr(generation_config, "num_beams", None) or 1),
            int(kwargs.get("num_return_sequences") or getattr(generation_config, "num_return_sequences", None) or 1),
        )
        per_row = [name for name in adapter_names for _ in range(copies)]
        handles = []

        def hook_all(root: torch.nn.Module, names: list[str]) -> None:
            for module in root.modules():
                if isinstance(module, (DynamicLoraLayer, AuxiliaryTrainingWrapper)):
                    hook = functools.partial(_inject_adapter_names, adapter_names=names)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

        hook_all(self.model, per_row)
        encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
        if copies > 1 and encoder is not None and encoder is not self.model:
            hook_all(encoder, list(adapter_names))  # registered later, so these run last: the encoder is not expanded
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: Optional[Union[int, dict[str, int]]] = None,
    ) -> None:
        """Add adapter `adapter_name` whose weight change is sum_i weights[i] * (change of adapters[i]), tier by tier.

        See `reso_hf.dynamic_lora.combination.add_weighted_adapter` for the combination types ("cat": exact,
        "svd": truncated SVD per tier, "linear": PEFT's factor-wise average) and the resulting tier layout.
        """
        combination.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank)

    # ----- dynamics ----------------------------------------------------------------------------------
    def dynamic_step(
        self,
        optimizer: Optional[torch.optim.Optimizer] = None,
        adapter_name: Optional[str] = None,
        allow_missing_gradients: bool = False,
    ) -> dict[str, Any]:
        """Run the dynamics once; call after `optimizer.step()` and before `optimizer.zero_grad()`.

        Passing the optimizer lets a non-finite rollback also clean the optimizer state of the factors.
        Returns the step's metrics (health, tiers' alpha_eff / rho / tau / screened fraction, queue, ...).
        """
        names = [adapter_name] if adapter_name else [a for a in self.active_adapters if a in self.peft_config]
        metrics: dict[str, Any] = {}
        for name in names:
            config = self.peft_config[name]
            if not config.dynamics_enabled or config.inference_mode:
                metrics[name] = {"dynamics": "disabled"}
                continue
            layers = self.adapter_layers(name)
            with whole_factors(layers, name):  # gathers FSDP-sharded factors (see .sharding)
                metrics[name] = self.dynamics(name).step(
                    layers, optimizer=optimizer, allow_missing_gradients=allow_missing_gradients
                )
        return metrics[names[0]] if len(names) == 1 else metrics

    def consolidate(self, adapter_name: Optional[str] = None, optimizer: Optional[torch.optim.Optimizer] = None
                    ) -> dict[str, Any]:
        """Fold the fast tiers into the memory tiers and protect what was consolidated (README, "Consolidation").

        On every adapted module, the summed delta W of all tiers is replaced by its truncated SVD held by the
        `consolidation_memory_tiers` slowest tiers (strongest directions in the slowest tier); the faster tiers are
        re-initialised (B = 0, fresh A), and the memory's column and row spaces are recorded for
        `protected_subspace`. The base weights are not touched. Call it at a task or session boundary
        (`DynamicLoraCallback(consolidate_every=..., consolidate_on_epoch=...)` or a `boundary` column do it under
        Trainer). Passing the optimizer drops its now meaningless state (Adam moments) of the factors.

        Returns the measured truncation error: "truncation_error" (||sum dW before - after||_F over all modules),
        "relative_truncation_error" (the same over ||sum dW before||_F), "max_relative_truncation_error" (worst
        module) and "per_module".
        """
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise KeyError(f"Unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}.")
        layers = self.adapter_layers(adapter_name)
        merged = sorted(name for name, layer in layers.items() if adapter_name in layer.merged_adapters)
        if merged:
            # the base weights hold the old delta W: unmerging after a consolidation would subtract the new one
            raise ValueError(f"consolidate() changes the factors of adapter {adapter_name!r}, which is merged into the "
                             f"base weights of {len(merged)} modules (e.g. {merged[0]}); call unmerge_adapter() first.")
        with whole_factors(layers, adapter_name):
            return self.dynamics(adapter_name).consolidate(layers, optimizer=optimizer)

    def vertical_cosines(self, adapter_name: Optional[str] = None) -> dict[str, dict[str, float]]:
        """Per-module vertical-resonance cosines of the last dynamic_step(): {"slow->fast": {module: v}}.

        v is the cosine between the fast tier's realised update of that step (before the dynamics acted on it) and
        the slow tier's delta W; the tuner's per-tier value (`health()["tiers"][fast]["vertical"]`) is their mean.
        Modules whose slow tier is zero or whose fast tier did not move have no cosine.
        """
        return {pair: dict(values) for pair, values in self.dynamics(adapter_name).vertical_cosines.items()}

    def health(self, adapter_name: Optional[str] = None) -> dict[str, Any]:
        """Health report: state (HEALTHY / ACCEPTABLE / DEGRADED / CRITICAL), reasons and the metrics behind it."""
        return self.dynamics(adapter_name).health()

    def rollback(self, n: int = 1, adapter_name: Optional[str] = None) -> list[dict]:
        """Undo the last `n` migrations exactly (newest first)."""
        adapter_name = adapter_name or self.active_adapters[0]
        layers = self.adapter_layers(adapter_name)
        with whole_factors(layers, adapter_name):
            return self.dynamics(adapter_name).rollback(layers, n)

    def migrate(self, module: str, source: str, adapter_name: Optional[str] = None, subspace=None) -> Optional[dict]:
        """Migrate the top-k pattern of tier `source` on `module` to the next slower tier now (manual trigger)."""
        adapter_name = adapter_name or self.active_adapters[0]
        tiers = self.peft_config[adapter_name].tiers
        if source not in tiers or tiers.index(source) == 0:
            raise ValueError(f"source must be one of {tiers[1:]} (a tier with a slower tier), got {source!r}.")
        target = tiers[tiers.index(source) - 1]
        layers = self.adapter_layers(adapter_name)
        with whole_factors(layers, adapter_name):
            return self.dynamics(adapter_name).run_migration(layers, module, source, target, subspace=subspace)

    def audit_log(self, adapter_name: Optional[str] = None) -> list[dict]:
        return list(self.dynamics(adapter_name).audit)

    def write_audit_log(self, path: str, adapter_name: Optional[str] = None) -> None:
        lines = [json.dumps(entry, sort_keys=True, allow_nan=False) for entry in self.audit_log(adapter_name)]
        atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))

    def ddp_params_to_ignore(self, adapter_name: Optional[str] = None, prefix: str = "") -> list[str]:
        """Names of the swarm/agent/session tier parameters, for DDP's ignore list.

        Under DDP every gradient is averaged, which would make the per-agent tiers identical across ranks and
        leave nothing for the resonance-weighted swarm synchronisation to do. Before wrapping, call
        `torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)`.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        config = self.peft_config[adapter_name]
        local = {t for t in config.tiers if config.scope_of(t) != "shared"}
        names = []
        for name, _ in self.model.named_parameters():
            match = _TIER_KEY.search(name)
            if match and match["adapter"] == adapter_name and match["tier"] in local:
                names.append(prefix + name)
        return names

    # ----- snapshots, provenance ---------------------------------------------------------------------
    def provenance(self, adapter_name: Optional[str] = None) -> str:
        """blake2b over canonical JSON of the config and the digests of every tier except session-scoped ones."""
        adapter_name = adapter_name or self.active_adapters[0]
        config = self.peft_config[adapter_name]
        excluded = {t for t in config.tiers if config.scope_of(t) == "session"}
        return provenance_hash(config, self.tier_tensors(adapter_name), excluded)

    def snapshot(self, adapter_name: Optional[str] = None) -> DynamicLoraSnapshot:
        adapter_name = adapter_name or self.active_adapters[0]
        tensors = {k: v.detach().clone() for k, v in self.tier_tensors(adapter_name).items()}
        snapshot = DynamicLoraSnapshot(
            adapter_name=adapter_name,
            step=self.dynamics(adapter_name).step_count,
            provenance=self.provenance(adapter_name),
            tensors=tensors,
            config=self.peft_config[adapter_name].to_dict(),
        )
        self.dynamics(adapter_name).record("snapshot", provenance=snapshot.provenance)
        return snapshot

    @torch.no_grad()
    def restore_snapshot(self, snapshot: DynamicLoraSnapshot) -> None:
        live = self.tier_tensors(snapshot.adapter_name)
        if set(live) != set(snapshot.tensors):
            raise ValueError("The snapshot does not match this adapter's modules and tiers.")
        for key, tensor in snapshot.tensors.items():
            if live[key].shape != tensor.shape:
                raise ValueError(f"Snapshot tensor {key} has shape {tuple(tensor.shape)}, adapter has "
                                 f"{tuple(live[key].shape)}.")
        for key, tensor in snapshot.tensors.items():
            live[key].copy_(tensor)
        dynamics = self.dynamics(snapshot.adapter_name)
        dynamics._set_anchors(self.adapter_layers(snapshot.adapter_name))
        dynamics.record("restore_snapshot", provenance=snapshot.provenance)

    # ----- persistence -------------------------------------------------------------------------------
    @contextmanager
    def gathered_factors(self):
        """Every adapter's factors whole on every rank while active, when FSDP shards them (a collective); no-op
        otherwise. The dynamics state is saved (on the main process only) and restored against whole factors."""
        with ExitStack() as stack:
            for name in self.peft_config:
                stack.enter_context(whole_factors(self.adapter_layers(name), name, write_back=False))
            yield

    def dynamics_state_dict(self, adapter_name: Optional[str] = None) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON payload) of the adapter's dynamics state as saved: compact, so it takes the adapter's
        current factors to be restored (`load_dynamics_state` finds them in the model)."""
        adapter_name = adapter_name or self.active_adapters[0]
        return self.dynamics(adapter_name).state_dict(self.tier_tensors(adapter_name))

    def save_dynamics_state(self, save_directory: str, adapter_name: Optional[str] = None,
                            saved_tiers: Optional[list[str]] = None) -> None:
        """Write the dynamics state (safetensors + JSON) and the audit log (JSON lines), each atomically.

        `saved_tiers`: the tiers whose weights go into the same folder (default: all).
        """
        adapter_name = adapter_name or self.active_adapters[0]
        config = self.peft_config[adapter_name]
        if saved_tiers is not None and list(saved_tiers) != list(config.tiers):
            # A subset (privacy / tiers=) is meant for sharing: per-element dynamics of unsaved tiers would
            # leak what the weights leave out, so only the audit log and a note are written.
            atomic_write_json(
                os.path.join(save_directory, DYNAMICS_STATE_JSON_NAME),
                {"format": STATE_FORMAT, "omitted": True, "saved_tiers": list(saved_tiers)},
            )
            self.write_audit_log(os.path.join(save_directory, AUDIT_LOG_NAME), adapter_name)
            return
        tensors, payload = self.dynamics_state_dict(adapter_name)
        os.makedirs(save_directory, exist_ok=True)
        atomic_save_safetensors(os.path.join(save_directory, DYNAMICS_STATE_TENSORS_NAME), tensors,
                                metadata={"format": "pt", DYNAMICS_STATE_TIERS_METADATA: json.dumps(config.tiers)})
        atomic_write_json(os.path.join(save_directory, DYNAMICS_STATE_JSON_NAME), payload)
        self.write_audit_log(os.path.join(save_directory, AUDIT_LOG_NAME), adapter_name)

    def load_dynamics_state(self, directory: str, adapter_name: Optional[str] = None,
                            weights: Optional[dict[str, torch.Tensor]] = None) -> bool:
        """Restore the dynamics state saved in `directory`; False if the folder holds none.

        The state stores only what the adapter weights saved with it do not determine: load those weights first
        (or pass them as `weights`, keyed like `tier_tensors`). A state from a different tier layout (names,
        ranks, modules) or of an unknown format version raises ValueError and changes nothing.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        json_path = os.path.join(directory, DYNAMICS_STATE_JSON_NAME)
        tensors_path = os.path.join(directory, DYNAMICS_STATE_TENSORS_NAME)
        if not os.path.isfile(json_path):
            return False
        with open(json_path, encoding="utf-8") as handle:
            payload = json.load(handle)
        if payload.get("omitted"):
            return False
        if not os.path.isfile(tensors_path):
            raise ValueError(f"{json_path} exists but {tensors_path} is missing: the dynamics state is incomplete.")
        tensors = load_safetensors(tensors_path)
        factors = self.tier_tensors(adapter_name)
        factors.update(weights or {})
        self.dynamics(adapter_name).load_state_dict(tensors, payload, factors)
        return True

    def save_pretrained(
        self,
        save_directory: str,
        tiers: Optional[list[str]] = None,
        include_private: bool = False,
        adapter_name: Optional[str] = None,
    ) -> list[str]:
        """Write the adapter like `PeftModel.save_pretrained`, restricted to `tiers` (default: all non-private).

        The folder loads with `PeftModel.from_pretrained`; tiers that were not written keep their fresh
        initialisation there. Returns the written tiers.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        config = self.peft_config[adapter_name]
        selected = self.select_tiers(adapter_name, tiers, include_private)
        state = {}
        for name, layer in self.adapter_layers(adapter_name).items():
            for tier in selected:
                state[f"base_model.model.{name}.dynamic_lora_A.{tier}"] = layer.dynamic_lora_A[adapter_name][tier]
                state[f"base_model.model.{name}.dynamic_lora_B.{tier}"] = layer.dynamic_lora_B[adapter_name][tier]
        os.makedirs(save_directory, exist_ok=True)
        atomic_save_safetensors(os.path.join(save_directory, "adapter_model.safetensors"), state)
        inference_mode = config.inference_mode
        config.inference_mode = True
        try:
            config.expect_dynamics_save(self, adapter_name, selected)
            config.save_pretrained(save_directory)  # also writes the dynamics state (see expect_dynamics_save)
        finally:
            config.inference_mode = inference_mode
        return selected

    def export_lora(self, save_directory: str, adapter_name: Optional[str] = None, tiers: Optional[list[str]] = None,
                    include_private: bool = False) -> dict:
        """Write a standard PEFT LoRA adapter (rank = sum of ranks) that plain PEFT loads without reso_hf."""
        return export_lora(self, save_directory, adapter_name=adapter_name, tiers=tiers,
                           include_private=include_private)

    # ----- PEFT hooks for saving and loading ----------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        chosen = [t for t in config.tiers if config.privacy_of(t) != "private"]
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, DynamicLoraModel):
            # PeftModel.save_pretrained saves this adapter's config next: it writes this tuner's dynamics state
            config.expect_dynamics_save(tuner, adapter_name, chosen)
        result = {}
        for key, value in selected.items():
            match = _TIER_KEY.search(key)
            if match and match["adapter"] == adapter_name and match["tier"] not in chosen:
                continue
            result[key] = value
        return result

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # Checkpoint tiers must exist in the model with the same ranks: checked before anything is loaded.
        for key, value in state_dict.items():
            match = _CHECKPOINT_TIER_KEY.match(key)
            if not match:
                continue
            tier = match["tier"]
            if tier not in config.tiers:
                raise ValueError(
                    f"The checkpoint holds tier {tier!r} ({key}) but the adapter config has tiers {config.tiers}: "
                    "the tier layouts differ."
                )
            rank_dim = 0 if match["which"] == "A" else 1
            if value.shape[rank_dim] != config.rank_of(tier):
                hint = ""
                if tier not in config.tier_ranks and value.shape[rank_dim] == PRE_ISSUE_20_RANKS[tier]:
                    hint = (f" The adapter was saved with the former default ranks {PRE_ISSUE_20_RANKS}: add "
                            f'"tier_ranks": {json.dumps({t: PRE_ISSUE_20_RANKS[t] for t in config.tiers})} to its '
                            "adapter_config.json.")
                raise ValueError(
                    f"The checkpoint's tier {tier!r} has rank {value.shape[rank_dim]} ({key}) but the adapter "
                    f"config gives rank {config.rank_of(tier)}: the tier layouts differ.{hint}"
                )
        remapped = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, DynamicLoraModel) and adapter_name in tuner.peft_config:
            # one-shot: a later load_adapter into this adapter from another folder must not reuse it
            source = config.__dict__.pop("_dynamics_source", None)
            # the weights are copied into the model after this hook: the state is restored against them
            incoming = {}
            for key, value in remapped.items():
                match = _TIER_KEY.search(key)
                if match and match["adapter"] == adapter_name:
                    module = key[: match.start()].removeprefix("base_model.model.")
                    incoming[factor_key(module, match["tier"], match.group(1))] = value
            restored = False
            if source is not None:
                directory = source[0] if source[1] is None else os.path.join(source[0], source[1])
                if os.path.isdir(directory):
                    restored = tuner.load_dynamics_state(directory, adapter_name, weights=incoming)
            if not restored:
                # No saved dynamics: the loaded weights become the reference (init and anchors).
                tuner.dynamics(adapter_name).reset_references(tuner.adapter_layers(adapter_name), incoming)
        return remapped

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.dynamics_registry.pop(adapter_name, None)
