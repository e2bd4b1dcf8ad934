"""The indexed store behind ResoLLM's `update_memory` / `recall` / memory prefix slots (`temporal_smf.store="indexed"`).

`IndexedSMFMemory` speaks the list store's language (`MemoryEntry` with torch tensors, `add`, `recall`, `strength`,
`advance`, `step`, `episode`) on top of `IndexedMemoryStore`; the full store API (knowledge graph, sampling,
`new_episode`) is its `store` attribute. `open_memory_store(model, path)` points a model at a database directory that
other processes may share.
"""

import numpy as np
import torch

from ..modeling.state_reso_llm import MemoryEntry, register_memory_store
from .store import IndexedMemoryStore, MemoryRecord


def _entry(record: MemoryRecord) -> MemoryEntry:
    return MemoryEntry(key=torch.from_numpy(np.array(record.key, dtype=np.float32)),
                       orientation=torch.from_numpy(np.array(record.orientation, dtype=np.float32)),
                       importance=record.importance, created_at=record.created_at, episode=record.episode,
                       text=record.text, kind=record.kind, entry_id=record.entry_id)


def store_options(config) -> dict:
    """`IndexedMemoryStore` keyword arguments from a ResoLLM config."""
    smf = config.temporal_smf
    return {"dim": config.hidden_size, "decay_rate": smf.memory_decay_rate, "capacity": smf.max_moments,
            "prune_below": smf.importance_threshold, "semantic_decay_rate": smf.semantic_decay_rate,
            "compression": smf.store_compression}


class IndexedSMFMemory:
    """`IndexedMemoryStore` seen as a ResoLLM memory."""

    def __init__(self, store: IndexedMemoryStore):
        self.store = store

    @classmethod
    def for_config(cls, config, path=None) -> "IndexedSMFMemory":
        return cls(IndexedMemoryStore(path, **store_options(config)))

    @classmethod
    def load_snapshot(cls, directory: str, document: dict, config) -> "IndexedSMFMemory":
        return cls(IndexedMemoryStore.load(directory, **store_options(config)))

    def save_snapshot(self, directory: str) -> dict:
        return self.store.save(directory)

    # the list store's interface ---------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.store.step

    @step.setter
    def step(self, value: int) -> None:
        self.store.step = value

    @property
    def episode(self) -> int:
        return self.store.episode

    @episode.setter
    def episode(self, value: int) -> None:
        self.store.episode = value

    def advance(self, steps: int) -> None:
        self.store.advance(steps)

    def strength(self, entry: MemoryEntry) -> float:
        return self.store.strength(entry)

    def add(self, key, orientation, importance: float, text: str, kind: str = "episodic", relations=()) -> MemoryEntry:
        record = self.store.add(key.detach().float().cpu().numpy(), orientation.detach().float().cpu().numpy(),
                                importance, text, kind, relations)
        return _entry(record)

    def recall(self, query: torch.Tensor, k: int) -> list[tuple[MemoryEntry, float]]:
        return [(_entry(r), score) for r, score in self.store.recall(query.detach().float().cpu().numpy(), k)]

    def prune(self) -> None:
        self.store.prune()

    @property
    def entries(self) -> list[MemoryEntry]:
        """Every entry, oldest first (reads the whole database: for inspection and tests)."""
        return [_entry(r) for r in self.store.records()]

    def entries_by_id(self, entry_ids) -> list[MemoryEntry]:
        return [_entry(r) for r in self.store.get(entry_ids)]

    def __len__(self) -> int:
        return len(self.store)


def open_memory_store(model, path) -> IndexedSMFMemory:
    """Back ``model``'s memory (and its entangled agents') by the database in directory ``path`` (created if missing;
    other processes may open the same directory). Needs ``temporal_smf.store="indexed"``."""
    smf = model.config.temporal_smf
    if smf.store != "indexed":
        raise ValueError(f"open_memory_store needs temporal_smf.store='indexed', got {smf.store!r}")
    memory = IndexedSMFMemory.for_config(model.config, path)
    model.reso_state.memory = memory
    model.reso_state.memory_context = []
    return memory


register_memory_store("indexed", IndexedSMFMemory)
