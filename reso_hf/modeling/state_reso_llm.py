"""State that outlives a forward call: goals (SPEC §3.6), Temporal SMF memory (§3.7), PRSC bindings (§3.5).

Each `ResoLLMForCausalLM` owns one `ResoState`; nothing is shared between model instances unless a
multi-agent group shares it on purpose. Self-contained (copied into checkpoints).
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

GOAL_TYPES = ("task", "exploratory", "constraint", "maintenance")
SMF_AXES = (
    "coherence", "identity", "duality", "harmony", "truth", "consciousness", "beauty", "compassion",
    "intention", "wisdom", "creativity", "stability", "complexity", "connection", "presence", "transcendence",
)
STATE_TENSORS_FILE = "reso_state.safetensors"
STATE_JSON_FILE = "reso_state.json"
MEMORY_KINDS = ("episodic", "semantic")

# Memory stores other than the built-in list, by `temporal_smf.store` name. Each backend has `for_config(config)` and
# `load_snapshot(directory, document, config)`; its stores have `save_snapshot(directory)` and `entries_by_id(ids)`
# besides the list store's methods. reso_hf registers "indexed" (reso_hf/memory/backend.py) when imported: a
# checkpoint loaded as remote code without reso_hf installed has only the list.
MEMORY_STORE_BACKENDS: dict = {}


def register_memory_store(name: str, backend) -> None:
    MEMORY_STORE_BACKENDS[name] = backend


def memory_store_backend(name: str):
    if name not in MEMORY_STORE_BACKENDS:
        raise ValueError(f"temporal_smf.store={name!r} needs the reso_hf package with its memory extra (pip install "
                         f"'reso-hf[memory]', then import reso_hf); available here: {('list', *MEMORY_STORE_BACKENDS)}")
    return MEMORY_STORE_BACKENDS[name]


@dataclass(eq=False)  # identity equality: fields hold tensors
class Goal:
    """An active goal: `vector` is the mean final hidden state of its description."""

    goal_id: int
    description: str
    goal_type: str
    vector: torch.Tensor = field(repr=False)
    progress: float = 0.0
    achieved: bool = False


@dataclass
class AttentionFocus:
    """A position the last token attended to, scored with the agency weights."""

    type: str
    target: int
    position: int
    intensity: float
    novelty: float
    relevance: float
    score: float


@dataclass(eq=False)  # identity equality: fields hold tensors
class MemoryEntry:
    key: torch.Tensor = field(repr=False)
    orientation: torch.Tensor = field(repr=False)
    importance: float
    created_at: int
    episode: int
    text: str
    kind: str = "episodic"  # "semantic" entries decay at temporal_smf.semantic_decay_rate
    entry_id: int | None = None  # the indexed store's id; None in the list store

    def axes(self) -> dict:
        """The 16 named sedenion axes of this memory's orientation."""
        return dict(zip(SMF_AXES, self.orientation.tolist()))


@dataclass(eq=False)  # identity equality: fields hold tensors
class ConceptBinding:
    """A named PRSC slot: `prime` is the token's prime or the product of composed primes."""

    name: str
    prime: int
    key: torch.Tensor = field(repr=False)
    value: torch.Tensor = field(repr=False)
    slot: int = -1


def _check_text(value, field_name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field_name} must be a non-empty string, got {value!r}")
    return value


class MemoryStore:
    """Entries with strength importance * exp(-decay * age); age counts model steps."""

    def __init__(self, decay_rate: float, capacity: int, prune_below: float, semantic_decay_rate: float = 0.0):
        self.decay_rate = decay_rate
        self.semantic_decay_rate = semantic_decay_rate
        self.capacity = capacity
        self.prune_below = prune_below
        self.entries: list[MemoryEntry] = []
        self.step = 0
        self.episode = 0

    def strength(self, entry: MemoryEntry) -> float:
        rate = self.decay_rate if entry.kind == "episodic" else self.semantic_decay_rate
        return entry.importance * math.exp(-rate * (self.step - entry.created_at))

    def advance(self, steps: int) -> None:
        self.step += steps

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, key, orientation, importance: float, text: str, kind: str = "episodic", relations=()) -> MemoryEntry:
        if isinstance(importance, bool) or not isinstance(importance, (int, float)) or not 0 <= importance <= 1:
            raise ValueError(f"importance must be a number in [0, 1], got {importance!r}")
        if kind not in MEMORY_KINDS:
            raise ValueError(f"kind={kind!r} is invalid: expected one of {MEMORY_KINDS}")
        if relations:
            raise ValueError("relations need temporal_smf.store='indexed': the list store keeps no knowledge graph")
        self.step += 1
        entry = MemoryEntry(key.detach().float().cpu(), orientation.detach().float().cpu(), float(importance),
                            self.step, self.episode, text, kind)
        self.entries.append(entry)
        self.prune()
        return entry

    def prune(self) -> None:
        """Drop entries weaker than the threshold, then the weakest beyond capacity."""
        self.entries = [e for e in self.entries if self.strength(e) >= self.prune_below]
        if len(self.entries) > self.capacity:
            self.entries.sort(key=self.strength, reverse=True)
            self.entries = self.entries[: self.capacity]

    def recall(self, query: torch.Tensor, k: int) -> list[tuple[MemoryEntry, float]]:
        """Top-k entries by cosine(key, query) x strength."""
        if not self.entries:
            return []
        keys = torch.stack([e.key for e in self.entries])
        cosine = torch.nn.functional.cosine_similarity(keys, query.detach().float().cpu()[None], dim=-1)
        strengths = torch.tensor([self.strength(e) for e in self.entries])
        scores = cosine * strengths
        top = scores.topk(min(k, len(self.entries)))
        return [(self.entries[i], float(s)) for s, i in zip(top.values, top.indices)]


class ResoState:
    """All per-instance state of a ResoLLMForCausalLM."""

    def __init__(self, config):
        self.config = config
        self.clear()

    def clear(self) -> None:
        """Forget everything, in place (entangled agents holding this object stay entangled)."""
        self.goals: list[Goal] = []
        self.next_goal_id = 0
        self.foci: list[AttentionFocus] = []
        self.bindings: dict[str, ConceptBinding] = {}
        smf = self.config.temporal_smf
        if smf.store == "list":
            self.memory = MemoryStore(smf.memory_decay_rate, smf.max_moments, smf.importance_threshold,
                                      smf.semantic_decay_rate)
        else:  # a new, empty store of its own (an attached shared database is left as it is on disk)
            self.memory = memory_store_backend(smf.store).for_config(self.config)
        self.memory_context: list[MemoryEntry] = []

    # goals -------------------------------------------------------------------------------------
    def add_goal(self, description: str, goal_type: str, vector: torch.Tensor) -> Goal:
        _check_text(description, "goal description")
        if goal_type not in GOAL_TYPES:
            raise ValueError(f"goal_type={goal_type!r} is invalid: expected one of {GOAL_TYPES}")
        if len(self.active_goals()) >= self.config.agency.max_goals:
            raise ValueError(f"agency.max_goals={self.config.agency.max_goals} goals are already active; "
                             "call reset_state() or let goals be achieved first")
        goal = Goal(self.next_goal_id, description, goal_type, vector.detach().float().cpu())
        self.next_goal_id += 1
        self.goals.append(goal)
        return goal

    def active_goals(self) -> list[Goal]:
        return [g for g in self.goals if not g.achieved]

    def prefix_vectors(self) -> torch.Tensor | None:
        """Vectors that enter attention as prefix slots: active goals, then recalled memories."""
        vectors = [g.vector for g in self.active_goals()] + [m.key for m in self.memory_context]
        return torch.stack(vectors) if vectors else None

    # persistence ---------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        tensors, goals, memories, bindings = {}, [], [], []
        for i, goal in enumerate(self.goals):
            tensors[f"goal.{i}"] = goal.vector
            goals.append({k: v for k, v in asdict(goal).items() if k != "vector"})
        store_document = None
        if isinstance(self.memory, MemoryStore):
            for i, entry in enumerate(self.memory.entries):
                tensors[f"memory.{i}.key"] = entry.key
                tensors[f"memory.{i}.orientation"] = entry.orientation
                memories.append({k: v for k, v in asdict(entry).items() if k not in ("key", "orientation")})
            context = [self.memory.entries.index(m) for m in self.memory_context if m in self.memory.entries]
        else:  # the store writes its own files; the context is kept as entry ids
            store_document = {"backend": self.config.temporal_smf.store, **self.memory.save_snapshot(directory)}
            context = [m.entry_id for m in self.memory_context]
        for i, binding in enumerate(self.bindings.values()):
            tensors[f"binding.{i}.key"] = binding.key
            tensors[f"binding.{i}.value"] = binding.value
            bindings.append({"name": binding.name, "prime": str(binding.prime), "slot": binding.slot})
        document = {"goals": goals, "next_goal_id": self.next_goal_id, "memories": memories,
                    "memory_step": self.memory.step, "memory_episode": self.memory.episode,
                    "memory_context": context, "bindings": bindings, "memory_store": store_document}
        _atomic(os.path.join(directory, STATE_TENSORS_FILE),
                lambda path: save_file({k: v.contiguous() for k, v in tensors.items()}, path))
        _atomic(os.path.join(directory, STATE_JSON_FILE), lambda path: _write_json(path, document))

    def load(self, directory: str) -> None:
        with open(os.path.join(directory, STATE_JSON_FILE), encoding="utf-8") as handle:
            document = json.load(handle)
        tensors = load_file(os.path.join(directory, STATE_TENSORS_FILE))
        self.goals = [Goal(vector=tensors[f"goal.{i}"], **g) for i, g in enumerate(document["goals"])]
        self.next_goal_id = document["next_goal_id"]
        store_document = document.get("memory_store")
        if store_document is not None:
            backend = memory_store_backend(store_document["backend"])
            self.memory = backend.load_snapshot(directory, store_document, self.config)
            self.memory.step, self.memory.episode = document["memory_step"], document["memory_episode"]
            self.memory_context = self.memory.entries_by_id(document["memory_context"])
        else:
            if not isinstance(self.memory, MemoryStore):
                raise ValueError(f"{directory} holds a list memory but temporal_smf.store="
                                 f"{self.config.temporal_smf.store!r}; load it with temporal_smf.store='list'")
            self.memory.entries = [
                MemoryEntry(key=tensors[f"memory.{i}.key"], orientation=tensors[f"memory.{i}.orientation"], **m)
                for i, m in enumerate(document["memories"])
            ]
            self.memory.step, self.memory.episode = document["memory_step"], document["memory_episode"]
            self.memory_context = [self.memory.entries[i] for i in document["memory_context"]]
        self.bindings = {
            b["name"]: ConceptBinding(b["name"], int(b["prime"]), tensors[f"binding.{i}.key"],
                                      tensors[f"binding.{i}.value"], b["slot"])
            for i, b in enumerate(document["bindings"])
        }


def _write_json(path: str, document: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)


def _atomic(path: str, write) -> None:
    temporary = path + ".tmp"
    write(temporary)
    # safetensors >= 0.8 writes 0600 whatever the umask (its issue #782): give the file the mode open() would.
    # (This file is copied into checkpoints, so it cannot use reso_hf's serialization helpers.)
    umask = os.umask(0o077)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    os.replace(temporary, path)
