"""WaveGen: a cache of generated continuations keyed by the prompt, the decoding settings and adapter provenance.

    cache = WaveGenCache(max_entries=1024)
    output = cache.generate(model, **tokenizer(prompt, return_tensors="pt"), max_new_tokens=64)   # as model.generate

**Key and dependencies.** The lookup key is blake2b over canonical JSON of (the prompt token ids and attention mask,
the effective decoding settings: `model.generation_config` updated with the call's keyword arguments, the sampling
seed, and the NAMES of the model components that act: see `fingerprint.py`). An entry also records the hash of each
of those components (runtime, base weights, ResoLLM state, each active adapter, each DynamicLoRA tier with a
non-zero effective scale). So one prompt has one entry per configuration of the model (e.g. with and without the
context tier), and switching back to a configuration finds its entry again.

**Invalidation rule.** An entry is valid while every component it depends on has the hash it recorded. A lookup
that finds the key but a changed dependency drops the entry (counted under each changed component in
`stats()["invalidations"]`), generates afresh and stores the new result. Consequences: a change of the context
(fastest) tier invalidates only the entries generated with the context tier acting; entries generated with it
switched off (weight 0) do not depend on it and survive any number of context updates; a change of a slow tier
(foundation, domain) invalidates every entry generated with that tier acting, normally all of them. `validate(model)`
applies the rule to every entry at once (for entries of the model's current configuration).

**Determinism.** A hit must equal what a fresh generation with the same settings returns, so only deterministic
decoding is cached: greedy and beam search, or sampling (`do_sample=True`, also beam-sample) with `seed=N`, which
becomes part of the key; the seed is applied inside `torch.random.fork_rng`, so the global RNG is the same after a
hit and after a miss. Refused with a ValueError: sampling without a seed, a ResoLLM with stochastic resonance and no
seed, `keep_stability_window=True`, a model in training mode with active dropout, and arguments whose effect cannot
be hashed (`logits_processor`, `stopping_criteria`, `streamer`, `assistant_model`, ...). Hits do not run the model:
no streamer output, no telemetry, no ResoLLM generation state update.

**Migration signal** (dynamic-lora-roadmap Phase 5.2). Every entry counts its hits. When an entry reaches
`migration_threshold` hits it becomes a training example for the slow tiers: handed to `on_migrate(examples)` at
once if a callback is set (then evicted), otherwise kept until `pop_migration_examples()` or
`export_migration_dataset(path)` takes it (then evicted). Training a slow tier on them changes that tier, which
invalidates the entries that depend on it: the cache empties itself of what the adapter has internalised.

**Capacity.** At most `max_entries` entries; a new entry beyond it evicts one by `eviction`: "lru" (least recently
used) or "lfu" (fewest hits, then least recently used).

**Persistence.** `save_pretrained(directory)` writes `wavegen_cache.json` atomically (JSON only, no pickle);
`WaveGenCache.from_pretrained(directory)` reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from ..dynamic_lora.export import canonical_json, tensor_digest
from ..dynamic_lora.serialization import atomic_write_json
from .fingerprint import ComponentHasher

CACHE_FILE = "wavegen_cache.json"
CACHE_FORMAT = "reso_hf.wavegen_cache"
CACHE_VERSION = 1
EVICTION_POLICIES = ("lru", "lfu")

# generate() arguments whose effect cannot be captured in a key (objects with behaviour or state)
UNCACHEABLE_ARGUMENTS = (
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "streamer", "assistant_model",
    "negative_prompt_ids", "negative_prompt_attention_mask", "synced_gpus", "past_key_values", "cache",
    "assistant_tokenizer", "tokenizer", "custom_generate",
)
# GenerationConfig fields that do not change the returned token ids
_VOLATILE_SETTINGS = ("transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash")


@dataclass
class WaveGenEntry:
    """One cached generation: the call's inputs and result, what it depends on, and its use counters."""

    key: str
    input_ids: list
    attention_mask: Optional[list]
    settings: dict
    dependencies: dict
    sequences: list
    generation_seconds: float
    created: int  # cache tick at creation
    last_used: int  # cache tick of the last hit (or of the creation)
    hits: int = 0
    migration_ready: bool = False

    def new_tokens(self) -> list[list[int]]:
        """Per row, the generated tokens (the sequence after the prompt's columns)."""
        width = len(self.input_ids[0])
        return [row[width:] for row in self.sequences]


@dataclass
class WaveGenStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    invalidated_entries: int = 0
    invalidations: dict = field(default_factory=dict)  # component -> entries it invalidated
    evictions: int = 0
    migrated: int = 0
    saved_seconds: float = 0.0  # generation time the hits did not spend (each hit: its entry's generation time)


def _check_positive_int(value, name: str, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "an int >= 1" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")
    return value


def _rows(tensor: Optional[torch.Tensor], name: str) -> Optional[list]:
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else ""
        raise ValueError(f"{name} must be a 2-D tensor (batch, length), got {type(tensor).__name__}{shape}.")
    return tensor.detach().cpu().tolist()


def _jsonable(value, name: str):
    """A model keyword argument as JSON (tensors by digest); anything else that JSON cannot hold is refused."""
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_digest(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{name}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"generate argument {name} is a {type(value).__name__}, which WaveGen cannot put in a cache key; "
                     "pass JSON values or tensors, or call model.generate directly.")


def _dropout_in_training(model) -> list[str]:
    return [name for name, module in model.named_modules()
            if module.training and isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0]


class WaveGenCache:
    """A cache of `generate` results keyed by prompt, decoding settings and the model's component hashes.

    Args:
        max_entries: capacity (entries; one entry = one `generate` call, all its rows).
        eviction: "lru" or "lfu" (see the module docstring).
        migration_threshold: hits after which an entry becomes a training example for the slow tiers (None: never).
        on_migrate: optional callable receiving a list of example dicts (see `migration_example`) when entries
            reach the threshold; they are evicted after the call.
        rehash_base: hash the base model's weights on every call instead of only when a version counter changes.
        tokenizer: optional; migration examples then carry decoded `prompt`, `completion` and `text` fields.
    """

    def __init__(self, max_entries: int = 1024, eviction: str = "lru", migration_threshold: Optional[int] = 8,
                 on_migrate: Optional[Callable[[list[dict]], None]] = None, rehash_base: bool = False,
                 tokenizer=None):
        self.max_entries = _check_positive_int(max_entries, "max_entries")
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {list(EVICTION_POLICIES)}, got {eviction!r}.")
        self.eviction = eviction
        self.migration_threshold = _check_positive_int(migration_threshold, "migration_threshold", allow_none=True)
        if on_migrate is not None and not callable(on_migrate):
            raise ValueError(f"on_migrate must be callable or None, got {type(on_migrate).__name__}.")
        self.on_migrate = on_migrate
        self.tokenizer = tokenizer
        self.hasher = ComponentHasher(rehash_base=rehash_base)
        self.entries: dict[str, WaveGenEntry] = {}
        self.stats_counters = WaveGenStats()
        self.tick = 0
        self.last_event: dict = {}

    # ----- keys ------------------------------------------------------------------------------------------------
    def request(self, model, input_ids=None, attention_mask=None, seed: Optional[int] = None, **kwargs) -> dict:
        """The cache view of one `generate` call: {"key", "settings", "dependencies", "input_ids", "attention_mask",
        "generate_kwargs", "seed"}. Raises ValueError for a call that is not deterministic or not hashable."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("WaveGen needs input_ids (the prompt token ids, shape (batch, length)).")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}.")
        refused = [name for name in UNCACHEABLE_ARGUMENTS if kwargs.get(name) is not None]
        if refused:
            raise ValueError(f"generate arguments {refused} cannot be part of a WaveGen cache key (their effect is "
                             f"code or state, not values); not cacheable: {list(UNCACHEABLE_ARGUMENTS)}.")
        if kwargs.get("keep_stability_window"):
            raise ValueError("keep_stability_window=True makes the result depend on the previous generation: "
                             "WaveGen refuses it; leave it False.")
        if kwargs.get("return_dict_in_generate"):
            raise ValueError("return_dict_in_generate=True: WaveGen stores token ids only; leave it False.")
        training_dropout = _dropout_in_training(model)
        if training_dropout:
            raise ValueError(f"the model is in training mode with active dropout ({training_dropout[0]}, ...): "
                             "generation is not deterministic; call model.eval() first.")
        generation_config, model_kwargs = model._prepare_generation_config(kwargs.get("generation_config"),
                                                                           **{k: v for k, v in kwargs.items()
                                                                              if k != "generation_config"})
        if generation_config.return_dict_in_generate:
            raise ValueError("generation_config.return_dict_in_generate=True: WaveGen stores token ids only; pass "
                             "return_dict_in_generate=False.")
        settings = {k: v for k, v in generation_config.to_dict().items() if k not in _VOLATILE_SETTINGS}
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        resonance = getattr(getattr(inner.config, "stochastic_resonance", None), "enabled", False)
        if (generation_config.do_sample or resonance) and seed is None:
            why = "do_sample=True" if generation_config.do_sample else "stochastic_resonance.enabled (noise)"
            raise ValueError(f"{why} is not deterministic: WaveGen caches greedy or beam search, or sampling with a "
                             "fixed seed; pass seed=<int> (it becomes part of the key) or do_sample=False.")
        adapter_names = model_kwargs.get("adapter_names")
        extra = tuple(a for a in (adapter_names or ()) if isinstance(a, str) and a != "__base__")
        dependencies = self.hasher.components(model, extra_adapters=extra)
        request = {
            "input_ids": _rows(input_ids, "input_ids"),
            "attention_mask": _rows(attention_mask, "attention_mask"),
            "settings": {"generation_config": settings,
                         "model_kwargs": _jsonable(model_kwargs, "model_kwargs"),
                         "seed": seed if (generation_config.do_sample or resonance) else None},
        }
        key_payload = {**request, "components": sorted(dependencies)}
        request["key"] = hashlib.blake2b(canonical_json(key_payload).encode(), digest_size=20).hexdigest()
        request["dependencies"] = dependencies
        request["generate_kwargs"] = kwargs
        request["seed"] = request["settings"]["seed"]
        request["input_tensor"] = input_ids
        request["attention_tensor"] = attention_mask
        return request

    # ----- generate ------------------------------------------------------------------------------------------
    def generate(self, model, input_ids=None, attention_mask=None, seed: Optional[int] = None,
                 **generate_kwargs) -> torch.LongTensor:
        """`model.generate(input_ids, attention_mask=..., **generate_kwargs)` through the cache: the same token ids
        (prompt + new tokens, on the prompt's device). `seed` (int) is required for sampling. What happened is in
        `self.last_event` ({"result": "hit" | "miss" | "invalidated", "key", "changed"})."""
        request = self.request(model, input_ids=input_ids, attention_mask=attention_mask, seed=seed,
                               **generate_kwargs)
        key, device = request["key"], request["input_tensor"].device
        self.tick += 1
        counters = self.stats_counters
        counters.lookups += 1
        entry = self.entries.get(key)
        changed: list[str] = []
        if entry is not None:
            changed = sorted(c for c, h in entry.dependencies.items() if request["dependencies"].get(c) != h)
            if not changed:
                entry.hits += 1
                entry.last_used = self.tick
                counters.hits += 1
                counters.saved_seconds += entry.generation_seconds
                self.last_event = {"result": "hit", "key": key, "changed": []}
                sequences = torch.tensor(entry.sequences, dtype=torch.long, device=device)
                self._note_hit(entry)
                return sequences
            self._invalidate(key, changed)
        counters.misses += 1
        start = time.perf_counter()
        sequences = self._fresh(model, request)
        elapsed = time.perf_counter() - start
        self._store(WaveGenEntry(
            key=key, input_ids=request["input_ids"], attention_mask=request["attention_mask"],
            settings=request["settings"], dependencies=request["dependencies"], sequences=sequences.cpu().tolist(),
            generation_seconds=elapsed, created=self.tick, last_used=self.tick))
        self.last_event = {"result": "invalidated" if changed else "miss", "key": key, "changed": changed}
        return sequences

    @staticmethod
    def _fresh(model, request: dict) -> torch.LongTensor:
        kwargs = dict(request["generate_kwargs"])
        if request["attention_tensor"] is not None:
            kwargs["attention_mask"] = request["attention_tensor"]
        seed = request["seed"]
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        if seed is not None and hasattr(inner, "_reso_generate"):
            kwargs["seed"] = seed  # ResoLLM seeds its stochastic-resonance noise with it
        devices = [request["input_tensor"].device] if request["input_tensor"].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            output = model.generate(request["input_tensor"], **kwargs)
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"model.generate returned a {type(output).__name__}, not token ids: WaveGen caches "
                             "only plain generate output (return_dict_in_generate=False).")
        return output

    def _note_hit(self, entry: WaveGenEntry) -> None:
        if self.migration_threshold is None or entry.migration_ready or entry.hits < self.migration_threshold:
            return
        entry.migration_ready = True
        if self.on_migrate is not None:
            examples = [self.migration_example(entry, row) for row in range(len(entry.sequences))]
            self.on_migrate(examples)
            self._remove(entry.key)
            self.stats_counters.migrated += 1

    # ----- bookkeeping ---------------------------------------------------------------------------------------
    def _remove(self, key: str) -> WaveGenEntry:
        return self.entries.pop(key)

    def _invalidate(self, key: str, changed: list[str]) -> None:
        self._remove(key)
        counters = self.stats_counters
        counters.invalidated_entries += 1
        for component in changed:
            counters.invalidations[component] = counters.invalidations.get(component, 0) + 1

    def _store(self, entry: WaveGenEntry) -> None:
        while len(self.entries) >= self.max_entries:
            self._remove(self._victim())
            self.stats_counters.evictions += 1
        self.entries[entry.key] = entry

    def _victim(self) -> str:
        if self.eviction == "lfu":
            return min(self.entries.values(), key=lambda e: (e.hits, e.last_used)).key
        return min(self.entries.values(), key=lambda e: e.last_used).key

    def validate(self, model) -> dict[str, int]:
        """Apply the invalidation rule to every entry now (instead of at its next lookup): an entry whose component
        set is the model's current one and whose recorded hash of any component differs is dropped. Returns
        component -> entries it invalidated in this sweep."""
        current = self.hasher.components(model)
        swept: dict[str, int] = {}
        for key, entry in list(self.entries.items()):
            if set(entry.dependencies) != set(current):
                continue  # made with another configuration (another set of acting components): checked at lookup
            changed = sorted(c for c, h in entry.dependencies.items() if current[c] != h)
            if changed:
                self._invalidate(key, changed)
                for component in changed:
                    swept[component] = swept.get(component, 0) + 1
        return swept

    def clear(self) -> None:
        """Drop every entry (the statistics stay)."""
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    # ----- statistics --------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Totals: lookups, hits, misses, hit_rate, invalidated_entries, invalidations (per component), evictions,
        migrated, saved_seconds, entries."""
        result = asdict(self.stats_counters)
        result["hit_rate"] = result["hits"] / result["lookups"] if result["lookups"] else 0.0
        result["entries"] = len(self.entries)
        return result

    def entry_stats(self) -> list[dict]:
        """Per entry: key, hits, hit rate since creation (hits per lookup tick), prompt and new token counts,
        generation time, dependencies (component names), migration state; most hit first."""
        rows = []
        for entry in self.entries.values():
            age = max(1, self.tick - entry.created + 1)
            rows.append({"key": entry.key, "hits": entry.hits, "hit_rate": entry.hits / age,
                         "rows": len(entry.input_ids), "prompt_tokens": len(entry.input_ids[0]),
                         "new_tokens": len(entry.sequences[0]) - len(entry.input_ids[0]),
                         "generation_seconds": entry.generation_seconds, "created": entry.created,
                         "last_used": entry.last_used, "dependencies": sorted(entry.dependencies),
                         "migration_ready": entry.migration_ready})
        return sorted(rows, key=lambda row: (-row["hits"], row["created"]))

    # ----- migration signal ---------------------------------------------------------------------------------
    def migration_example(self, entry: WaveGenEntry, row: int = 0) -> dict:
        """Row `row` of an entry as an SFT example: prompt_ids (padding removed), completion_ids, hits, the
        components it depended on; with a tokenizer also the decoded prompt, completion and text (prompt and
        completion together)."""
        mask = entry.attention_mask[row] if entry.attention_mask is not None else [1] * len(entry.input_ids[row])
        prompt_ids = [t for t, m in zip(entry.input_ids[row], mask) if m]
        completion_ids = list(entry.new_tokens()[row])
        pad = entry.settings["generation_config"].get("pad_token_id")
        eos = entry.settings["generation_config"].get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        for index, token in enumerate(completion_ids):
            if token in eos:  # what follows the first EOS is padding
                completion_ids = completion_ids[:index + 1]
                break
        if pad is not None and pad not in eos:
            while completion_ids and completion_ids[-1] == pad:
                completion_ids.pop()
        example = {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "hits": entry.hits,
                   "dependencies": entry.dependencies, "key": entry.key}
        if self.tokenizer is not None:
            example["prompt"] = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
            example["completion"] = self.tokenizer.decode(completion_ids, skip_special_tokens=True)
            example["text"] = self.tokenizer.decode(prompt_ids + completion_ids, skip_special_tokens=True)
        return example

    def migration_candidates(self) -> list[WaveGenEntry]:
        """Entries that reached `migration_threshold` hits and have not been handed out yet."""
        return [entry for entry in self.entries.values() if entry.migration_ready]

    def pop_migration_examples(self) -> list[dict]:
        """The migration candidates as SFT examples (one per row), evicting them from the cache."""
        examples = []
        for entry in self.migration_candidates():
            examples.extend(self.migration_example(entry, row) for row in range(len(entry.sequences)))
            self._remove(entry.key)
            self.stats_counters.migrated += 1
        return examples

    def export_migration_dataset(self, path: str) -> int:
        """Write the migration candidates as a JSON-lines SFT dataset (one example per line, atomically; with a
        tokenizer the `text` column is what `reso-hf sft --data_files` reads) and evict them. Returns the count."""
        from ..dynamic_lora.serialization import atomic_write_text

        examples = self.pop_migration_examples()
        atomic_write_text(path, "".join(json.dumps(example, sort_keys=True) + "\n" for example in examples))
        return len(examples)

    # ----- persistence ---------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str) -> str:
        """Write `wavegen_cache.json` into `save_directory` (atomically). Returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CACHE_FILE)
        atomic_write_json(path, {
            "format": CACHE_FORMAT, "version": CACHE_VERSION,
            "settings": {"max_entries": self.max_entries, "eviction": self.eviction,
                         "migration_threshold": self.migration_threshold, "rehash_base": self.hasher.rehash_base},
            "tick": self.tick, "stats": asdict(self.stats_counters),
            "entries": [asdict(entry) for entry in self.entries.values()],
        })
        return path

    @classmethod
    def from_pretrained(cls, directory: str, **overrides) -> "WaveGenCache":
        """Load a cache written by `save_pretrained`; keyword arguments override its saved settings (and give
        `on_migrate`, `tokenizer`). A smaller `max_entries` evicts at once by the eviction policy."""
        path = os.path.join(directory, CACHE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: no WaveGen cache in {directory!r}.")
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
        if document.get("format") != CACHE_FORMAT or document.get("version") != CACHE_VERSION:
            raise ValueError(f"{path} is not a WaveGen cache of format {CACHE_FORMAT!r} version {CACHE_VERSION} "
                             f"(found format={document.get('format')!r}, version={document.get('version')!r}).")
        cache = cls(**{**document["settings"], **overrides})
        cache.tick = int(document["tick"])
        cache.stats_counters = WaveGenStats(**document["stats"])
        for raw in document["entries"]:
            entry = WaveGenEntry(**raw)
            cache.entries[entry.key] = entry
        while len(cache.entries) > cache.max_entries:
            cache._remove(cache._victim())
            cache.stats_counters.evictions += 1
        return cache


def cached_generate(model, cache: WaveGenCache, input_ids=None, **generate_kwargs) -> torch.LongTensor:
    """`model.generate(...)` through `cache` (see `WaveGenCache.generate`)."""
    return cache.generate(model, input_ids=input_ids, **generate_kwargs)
