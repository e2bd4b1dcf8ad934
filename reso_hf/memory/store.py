"""A Temporal SMF memory (SPEC §3.7) that scales: SQLite for entries, relations and the clock, an ANN index for keys.

Layout of a store directory:
  reso_memory.sqlite      the source of truth (WAL mode, one transaction per write): entries with their encoded
                          key, orientation, importance, kind, episode and decay anchor; knowledge-graph triples;
                          tombstones of deleted entries; the clock and a revision counter.
  reso_memory.faiss(.json) an optional snapshot of the ANN index with the revision it reflects; the index is derived
                          data, rebuilt from the database whenever the snapshot is missing or stale.

Strength follows the SMF rule, strength = importance * exp(-lambda * age), with lambda = `decay_rate` for episodic
entries and `semantic_decay_rate` (default 0: consolidated knowledge does not fade) for semantic ones. Each entry keeps
the anchor ln(importance) + lambda * created_at, so "strength < threshold" is "anchor < ln(threshold) + lambda * step":
pruning is an indexed range query instead of a scan.

Several processes may write one store: SQLite serialises the transactions (busy timeout), and each process brings its
in-memory index up to date from the database's revision before searching (new rows by id, deletions by tombstone).
A killed writer loses at most the transaction it was in.

This module needs numpy and the standard library only (faiss and networkx are imported when used), and imports nothing
from reso_hf, so writer processes can load it without transformers.
"""

import json
import math
import os
import sqlite3
import tempfile
import weakref
from dataclasses import dataclass, field

import numpy as np

from .ann import (
    build_exact_index,
    build_ivf_index,
    check_compression,
    default_lists,
    faiss_module,
    normalise,
    set_probes,
    training_sample,
)

DATABASE_FILE = "reso_memory.sqlite"
INDEX_FILE = "reso_memory.faiss"
INDEX_META_FILE = "reso_memory.faiss.json"
FORMAT_VERSION = 1
KINDS = ("episodic", "semantic")
STORE_COMPRESSIONS = ("fp32", "fp16", "int8")  # PQ would lose the keys that prefix slots need
BUSY_TIMEOUT_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so index ids and tombstones stay unambiguous
    kind TEXT NOT NULL CHECK (kind IN ('episodic', 'semantic')),
    text TEXT NOT NULL,
    importance REAL NOT NULL CHECK (importance >= 0 AND importance <= 1),
    created_at INTEGER NOT NULL,
    episode INTEGER NOT NULL,
    anchor REAL NOT NULL,                  -- ln(importance) + lambda_kind * created_at
    access_count INTEGER NOT NULL DEFAULT 0,
    key BLOB NOT NULL,                     -- encoded with the store's compression
    key_scale REAL NOT NULL,               -- int8 dequantisation scale (1 otherwise)
    orientation BLOB NOT NULL              -- float32
);
CREATE INDEX IF NOT EXISTS entries_by_strength ON entries (kind, anchor);
CREATE TABLE IF NOT EXISTS tombstones (entry_id INTEGER PRIMARY KEY, revision INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tombstones_by_revision ON tombstones (revision);
CREATE TABLE IF NOT EXISTS relations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    relation TEXT NOT NULL,
    object TEXT NOT NULL,
    entry_id INTEGER REFERENCES entries (id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS relations_by_subject ON relations (subject);
CREATE INDEX IF NOT EXISTS relations_by_object ON relations (object);
"""


@dataclass(eq=False)
class MemoryRecord:
    """One stored entry; ``key`` is the decoded key (what the store's compression kept)."""

    entry_id: int
    kind: str
    text: str
    importance: float
    created_at: int
    episode: int
    access_count: int
    key: np.ndarray = field(repr=False)
    orientation: np.ndarray = field(repr=False)


def encode_key(key: np.ndarray, compression: str) -> tuple[bytes, float]:
    """(bytes, scale) of a key: float32, float16, or int8 with one symmetric scale max|x|/127 per vector."""
    key = np.asarray(key, dtype=np.float32)
    if compression == "fp32":
        return key.tobytes(), 1.0
    if compression == "fp16":
        return key.astype(np.float16).tobytes(), 1.0
    scale = float(np.abs(key).max()) / 127.0 or 1.0
    return np.clip(np.rint(key / scale), -127, 127).astype(np.int8).tobytes(), scale


def decode_key(blob: bytes, scale: float, compression: str) -> np.ndarray:
    dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[compression]
    values = np.frombuffer(blob, dtype=dtype).astype(np.float32)
    return values * np.float32(scale) if compression == "int8" else values


def _check_number(value, field_name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{field_name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: expected one of {KINDS}")
    return kind


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


class IndexedMemoryStore:
    """SMF memory in a SQLite database with an ANN index over the keys.

    ``path`` is the store's directory (created if missing); None keeps it in a temporary directory removed with the
    object. The clock (`step`) and `episode` live in this process and are written to the database with each write
    (the larger clock of the writers wins). `exact_below` entries are searched exactly; beyond that an IVF index with
    about 4 sqrt(N) lists is trained and searched with `probes` lists per query, retrained when the store has grown
    fourfold since its last training.
    """

    def __init__(self, path=None, *, dim: int, decay_rate: float = 0.01, capacity: int = 1000,
                 prune_below: float = 0.01, semantic_decay_rate: float = 0.0, compression: str = "fp16",
                 orientation_dim: int = 16, exact_below: int = 20_000, probes: int = 32, candidate_factor: int = 4):
        check_compression(compression, STORE_COMPRESSIONS, "temporal_smf.store_compression")
        for name, value in (("dim", dim), ("capacity", capacity), ("orientation_dim", orientation_dim),
                            ("exact_below", exact_below), ("probes", probes), ("candidate_factor", candidate_factor)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.decay_rate = _check_number(decay_rate, "decay_rate", 0.0, math.inf)
        self.semantic_decay_rate = _check_number(semantic_decay_rate, "semantic_decay_rate", 0.0, math.inf)
        self.prune_below = _check_number(prune_below, "prune_below", 0.0, 1.0)
        self.dim, self.capacity, self.compression = dim, capacity, compression
        self.orientation_dim = orientation_dim
        self.exact_below, self.probes, self.candidate_factor = exact_below, probes, candidate_factor
        if path is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="reso_memory_")
            path = self._temporary.name
        os.makedirs(path, exist_ok=True)
        self.directory = str(path)
        self.database_path = os.path.join(self.directory, DATABASE_FILE)
        self._connection = self._connect(self.database_path)
        weakref.finalize(self, self._connection.close)
        self.step, self.episode = 0, 0
        self._index = None
        self._index_kind = None  # "exact" or "ivf"
        self._trained_count = 0
        self._indexed_revision = -1
        self._indexed_max_id = 0
        self._initialise()

    # database --------------------------------------------------------------------------------------------------------
    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE takes the write lock up front, so two
        # writers queue on the busy timeout instead of failing on a lock upgrade).
        connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA foreign_keys=ON")
        return connection

    def _write(self, changes_entries: bool = True):
        return _WriteTransaction(self, changes_entries)

    def _meta(self, name: str, default=None):
        row = self._connection.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return default if row is None else json.loads(row[0])

    def _set_meta(self, name: str, value) -> None:
        self._connection.execute("INSERT INTO meta (name, value) VALUES (?, ?) "
                                 "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name, json.dumps(value)))

    def _initialise(self) -> None:
        # Not executescript: it commits on its own. Two processes may create the tables at once: one waits.
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._connection.execute(statement)
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        self._connection.execute("COMMIT")
        with self._write(changes_entries=False):  # anchors may change below, keys do not
            stored = {name: self._meta(name) for name in ("format_version", "dim", "compression", "orientation_dim",
                                                          "decay_rate", "semantic_decay_rate")}
            wanted = {"format_version": FORMAT_VERSION, "dim": self.dim, "compression": self.compression,
                      "orientation_dim": self.orientation_dim, "decay_rate": self.decay_rate,
                      "semantic_decay_rate": self.semantic_decay_rate}
            if stored["format_version"] is None:
                for name, value in wanted.items():
                    self._set_meta(name, value)
                self._set_meta("revision", 0)
                self._set_meta("step", 0)
                self._set_meta("episode", 0)
            else:
                for name in ("format_version", "dim", "compression", "orientation_dim"):
                    if stored[name] != wanted[name]:
                        raise ValueError(f"the memory store at {self.directory} has {name}={stored[name]!r}, "
                                         f"this model wants {wanted[name]!r}")
                if (stored["decay_rate"], stored["semantic_decay_rate"]) != (self.decay_rate, self.semantic_decay_rate):
                    self._reanchor()
            self.step, self.episode = self._meta("step"), self._meta("episode")

    def _reanchor(self) -> None:
        """New decay rates: recompute every anchor (inside the caller's transaction)."""
        for kind, rate in (("episodic", self.decay_rate), ("semantic", self.semantic_decay_rate)):
            rows = self._connection.execute("SELECT id, importance, created_at FROM entries WHERE kind = ?", (kind,))
            self._connection.executemany("UPDATE entries SET anchor = ? WHERE id = ?",
                                         [(_log(i) + rate * c, entry_id) for entry_id, i, c in rows.fetchall()])
        self._set_meta("decay_rate", self.decay_rate)
        self._set_meta("semantic_decay_rate", self.semantic_decay_rate)

    def _rate(self, kind: str) -> float:
        return self.decay_rate if kind == "episodic" else self.semantic_decay_rate

    def revision(self) -> int:
        return self._meta("revision")

    def __len__(self) -> int:
        return self._connection.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    # SMF rules ---------------------------------------------------------------------------------------------------------
    def strength(self, record: MemoryRecord) -> float:
        return record.importance * math.exp(-self._rate(record.kind) * (self.step - record.created_at))

    def advance(self, steps: int) -> None:
        """Age the memories by ``steps`` model steps (kept in this process until the next write)."""
        self.step += steps

    def new_episode(self) -> int:
        """Later entries belong to a new episode id."""
        self.episode += 1
        return self.episode

    def add(self, key, orientation, importance: float, text: str, kind: str = "episodic",
            relations=()) -> MemoryRecord:
        """Store one entry (and its knowledge-graph triples) in one transaction, then prune. The clock advances by one."""
        _check_number(importance, "importance", 0.0, 1.0)
        _check_kind(kind)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"memory text must be a non-empty string, got {text!r}")
        key = np.asarray(key, dtype=np.float32).reshape(-1)
        orientation = np.asarray(orientation, dtype=np.float32).reshape(-1)
        if key.shape != (self.dim,) or orientation.shape != (self.orientation_dim,):
            raise ValueError(f"key must have {self.dim} values and orientation {self.orientation_dim}, "
                             f"got {key.shape[0]} and {orientation.shape[0]}")
        triples = [self._check_triple(t) for t in relations]
        blob, scale = encode_key(key, self.compression)
        with self._write() as transaction:
            created = transaction.step + 1
            transaction.step = created
            cursor = self._connection.execute(
                "INSERT INTO entries (kind, text, importance, created_at, episode, anchor, key, key_scale, orientation) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, text, float(importance), created, self.episode, _log(importance) + self._rate(kind) * created,
                 blob, scale, orientation.tobytes()))
            entry_id = cursor.lastrowid
            self._connection.executemany("INSERT INTO relations (subject, relation, object, entry_id) VALUES (?, ?, ?, ?)",
                                         [(*t, entry_id) for t in triples])
            self._prune_in(transaction)
        return MemoryRecord(entry_id, kind, text, float(importance), created, self.episode, 0,
                            decode_key(blob, scale, self.compression), orientation)

    def add_many(self, keys, texts, importances, kind: str = "episodic") -> list[int]:
        """Bulk insert (one transaction, no orientation: zeros), for benchmarks and imports. Returns the ids."""
        _check_kind(kind)
        keys = np.asarray(keys, dtype=np.float32)
        if keys.ndim != 2 or keys.shape[1] != self.dim or not len(keys) == len(texts) == len(importances):
            raise ValueError(f"keys must be (N, {self.dim}) with N texts and N importances")
        zeros = np.zeros(self.orientation_dim, dtype=np.float32).tobytes()
        with self._write() as transaction:
            first = transaction.step + 1
            transaction.step += len(keys)
            rows = []
            for offset, (key, text, importance) in enumerate(zip(keys, texts, importances)):
                created = first + offset
                blob, scale = encode_key(key, self.compression)
                rows.append((kind, text, float(importance), created, self.episode,
                             _log(importance) + self._rate(kind) * created, blob, scale, zeros))
            before = self._connection.execute("SELECT COALESCE(MAX(id), 0) FROM entries").fetchone()[0]
            self._connection.executemany(
                "INSERT INTO entries (kind, text, importance, created_at, episode, anchor, key, key_scale, orientation) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            ids = [r[0] for r in self._connection.execute("SELECT id FROM entries WHERE id > ? ORDER BY id", (before,))]
            self._prune_in(transaction)
        return ids

    def prune(self) -> list[int]:
        """Delete entries weaker than `prune_below`, then the weakest beyond `capacity`; returns the deleted ids."""
        with self._write() as transaction:
            return self._prune_in(transaction)

    def _prune_in(self, transaction) -> list[int]:
        threshold = _log(self.prune_below)
        step = transaction.step
        weak = self._connection.execute(
            "SELECT id FROM entries WHERE (kind = 'episodic' AND anchor < ?) OR (kind = 'semantic' AND anchor < ?)",
            (threshold + self.decay_rate * step, threshold + self.semantic_decay_rate * step)).fetchall()
        doomed = [row[0] for row in weak]
        excess = len(self) - len(doomed) - self.capacity
        if excess > 0:
            placeholders = ",".join("?" * len(doomed))
            exclude = f"AND id NOT IN ({placeholders})" if doomed else ""
            weakest = self._connection.execute(
                "SELECT id FROM entries WHERE 1 " + exclude + " ORDER BY anchor - CASE kind WHEN 'episodic' THEN ? "
                "ELSE ? END, id LIMIT ?", (*doomed, self.decay_rate * step, self.semantic_decay_rate * step, excess))
            doomed += [row[0] for row in weakest.fetchall()]
        if doomed:
            self._connection.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in doomed])
            self._connection.executemany("INSERT INTO tombstones (entry_id, revision) VALUES (?, ?)",
                                         [(i, transaction.revision) for i in doomed])
        return doomed

    def consolidate(self, min_accesses: int) -> list[int]:
        """Turn the episodic entries recalled at least ``min_accesses`` times into semantic ones (they then decay at
        `semantic_decay_rate` from their creation step); returns their ids."""
        if isinstance(min_accesses, bool) or not isinstance(min_accesses, int) or min_accesses < 1:
            raise ValueError(f"min_accesses must be an int >= 1, got {min_accesses!r}")
        with self._write(changes_entries=False):  # the keys, and so the index, stay as they are
            rows = self._connection.execute(
                "SELECT id, importance, created_at FROM entries WHERE kind = 'episodic' AND access_count >= ? "
                "ORDER BY id", (min_accesses,)).fetchall()
            self._connection.executemany(
                "UPDATE entries SET kind = 'semantic', anchor = ? WHERE id = ?",
                [(_log(importance) + self.semantic_decay_rate * created, entry_id)
                 for entry_id, importance, created in rows])
        return [row[0] for row in rows]

    # reading -----------------------------------------------------------------------------------------------------------
    _COLUMNS = "id, kind, text, importance, created_at, episode, access_count, key, key_scale, orientation"

    def _record(self, row) -> MemoryRecord:
        entry_id, kind, text, importance, created, episode, accesses, blob, scale, orientation = row
        return MemoryRecord(entry_id, kind, text, importance, created, episode, accesses,
                            decode_key(blob, scale, self.compression), np.frombuffer(orientation, dtype=np.float32))

    def get(self, entry_ids) -> list[MemoryRecord]:
        """Records of the given ids that exist, in the given order."""
        entry_ids = [int(i) for i in entry_ids]
        found = {}
        for start in range(0, len(entry_ids), 500):  # SQLite's bound-parameter limit
            chunk = entry_ids[start:start + 500]
            query = f"SELECT {self._COLUMNS} FROM entries WHERE id IN ({','.join('?' * len(chunk))})"
            found.update({row[0]: self._record(row) for row in self._connection.execute(query, chunk)})
        return [found[i] for i in entry_ids if i in found]

    def records(self, kind: str | None = None) -> list[MemoryRecord]:
        """Every entry (of one kind), oldest first. For inspection: a large store should be searched instead."""
        where, parameters = ("WHERE kind = ?", (_check_kind(kind),)) if kind is not None else ("", ())
        rows = self._connection.execute(f"SELECT {self._COLUMNS} FROM entries {where} ORDER BY id", parameters)
        return [self._record(row) for row in rows]

    def recall(self, query, k: int, kind: str | None = None, count_access: bool = True):
        """Top-k entries by cosine(key, query) x strength, as [(record, score)].

        The index proposes `candidate_factor` x k entries by cosine (exact below `exact_below` entries, IVF beyond);
        those are scored with the cosine of their stored key and their strength. ``count_access`` adds one to each
        returned entry's access count (the statistics `sample` does not use; recall order never depends on it)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if kind is not None:
            _check_kind(kind)
        self.sync()
        total = self._index.ntotal
        if total == 0:
            return []
        query = np.asarray(query, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self.dim:
            raise ValueError(f"query must have {self.dim} values, got {query.shape[1]}")
        wanted = min(total, k * self.candidate_factor * (1 if kind is None else 2))
        _, ids = self._index.search(normalise(query), wanted)
        records = self.get([i for i in ids[0].tolist() if i >= 0])
        if kind is not None:
            records = [r for r in records if r.kind == kind]
        unit_query = normalise(query)[0].astype(np.float64)
        scored = []
        for record in records:
            key = record.key.astype(np.float64)
            cosine = float(key @ unit_query / max(np.linalg.norm(key), 1e-12))
            scored.append((record, cosine * self.strength(record)))
        scored.sort(key=lambda pair: (-pair[1], pair[0].entry_id))
        chosen = scored[:k]
        if count_access and chosen:
            with self._write(changes_entries=False):
                self._connection.executemany("UPDATE entries SET access_count = access_count + 1 WHERE id = ?",
                                             [(r.entry_id,) for r, _ in chosen])
        return chosen

    def sample(self, count: int, seed: int | None = None, kind: str | None = None) -> list[MemoryRecord]:
        """``count`` distinct entries drawn with probability proportional to their strength (importance-sampled
        access, e.g. for replay); reproducible with ``seed``."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        where, parameters = ("WHERE kind = ?", (_check_kind(kind),)) if kind is not None else ("", ())
        rows = self._connection.execute(f"SELECT id, kind, anchor FROM entries {where} ORDER BY id", parameters)
        rows = rows.fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        log_strength = np.array([r[2] - self._rate(r[1]) * self.step for r in rows], dtype=np.float64)
        weights = np.exp(log_strength - (log_strength.max() if len(rows) else 0.0))
        available = int((weights > 0).sum())
        if count > available:
            raise ValueError(f"count={count} exceeds the {available} entries with non-zero strength")
        chosen = np.random.default_rng(seed).choice(ids, size=count, replace=False, p=weights / weights.sum())
        return self.get(chosen.tolist())

    # knowledge graph ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_triple(triple) -> tuple[str, str, str]:
        if not (isinstance(triple, (tuple, list)) and len(triple) == 3
                and all(isinstance(part, str) and part.strip() for part in triple)):
            raise ValueError(f"a relation must be (subject, relation, object) of non-empty strings, got {triple!r}")
        return tuple(triple)

    def add_relation(self, subject: str, relation: str, obj: str, entry_id: int | None = None) -> None:
        """A (subject, relation, object) triple, optionally tied to an entry (deleted with it)."""
        triple = self._check_triple((subject, relation, obj))
        with self._write():
            self._connection.execute("INSERT INTO relations (subject, relation, object, entry_id) VALUES (?, ?, ?, ?)",
                                     (*triple, entry_id))

    def triples(self) -> list[tuple[str, str, str, int | None]]:
        rows = self._connection.execute("SELECT subject, relation, object, entry_id FROM relations ORDER BY id")
        return [tuple(row) for row in rows]

    def graph(self):
        """The knowledge graph as a networkx MultiDiGraph: entities are nodes, each triple an edge subject -> object
        with attributes ``relation`` and ``entry_id``."""
        import networkx

        graph = networkx.MultiDiGraph()
        for subject, relation, obj, entry_id in self.triples():
            graph.add_edge(subject, obj, relation=relation, entry_id=entry_id)
        return graph

    def related(self, entity: str, depth: int = 1) -> list[tuple[str, str, str]]:
        """Triples between entities within ``depth`` hops of ``entity`` (edges followed both ways), sorted."""
        import networkx

        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        graph = self.graph()
        if entity not in graph:
            return []
        near = networkx.single_source_shortest_path_length(graph.to_undirected(as_view=True), entity, cutoff=depth)
        return sorted((s, data["relation"], o) for s, o, data in graph.subgraph(near).edges(data=True))

    def path(self, source: str, target: str) -> list[tuple[str, str, str]]:
        """The triples along a shortest chain of relations from ``source`` to ``target`` (edges followed both ways);
        [] when they are not connected."""
        import networkx

        graph = self.graph()
        if source not in graph or target not in graph:
            return []
        try:
            nodes = networkx.shortest_path(graph.to_undirected(as_view=True), source, target)
        except networkx.NetworkXNoPath:
            return []
        chain = []
        for a, b in zip(nodes, nodes[1:]):
            forward = graph.get_edge_data(a, b)
            s, o, edges = (a, b, forward) if forward else (b, a, graph.get_edge_data(b, a))
            chain.append((s, edges[min(edges)]["relation"], o))
        return chain

    # index -------------------------------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Bring this process's index up to the database's revision: rebuild when the index kind or size class
        changes, otherwise add the new rows and remove the tombstoned ones. The reads share one snapshot (a read
        transaction), so rows another process commits meanwhile wait for the next sync."""
        self._connection.execute("BEGIN")
        try:
            self._sync_in_snapshot()
        finally:
            self._connection.execute("COMMIT")

    def _sync_in_snapshot(self) -> None:
        revision = self.revision()
        if revision == self._indexed_revision:
            return
        count = len(self)
        wanted_kind = "exact" if count < self.exact_below else "ivf"
        if (self._index is None or wanted_kind != self._index_kind
                or (wanted_kind == "ivf" and count >= 4 * self._trained_count)):
            self._rebuild(revision)
            return
        removed = [row[0] for row in self._connection.execute(
            "SELECT entry_id FROM tombstones WHERE revision > ? AND entry_id <= ?",
            (self._indexed_revision, self._indexed_max_id))]
        if removed:
            self._index.remove_ids(np.array(removed, dtype=np.int64))
        ids, keys = self._keys_after(self._indexed_max_id)
        if len(ids):
            self._index.add_with_ids(normalise(keys), ids)
            self._indexed_max_id = int(ids.max())
        self._indexed_revision = revision

    def _keys_after(self, last_id: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._connection.execute("SELECT id, key, key_scale FROM entries WHERE id > ? ORDER BY id", (last_id,))
        ids, keys = [], []
        for entry_id, blob, scale in rows:
            ids.append(entry_id)
            keys.append(decode_key(blob, scale, self.compression))
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return np.array(ids, dtype=np.int64), np.stack(keys)

    def _rebuild(self, revision: int) -> None:
        ids, keys = self._keys_after(0)
        unit = normalise(keys) if len(ids) else keys
        if len(ids) < self.exact_below:
            index, kind = build_exact_index(self.dim, self.compression), "exact"
            if not index.is_trained:
                # int8's per-dimension ranges: from the data, or the unit range while the store is empty
                index.train(unit if len(ids) else np.stack([np.ones(self.dim), -np.ones(self.dim)]).astype(np.float32))
        else:
            lists = default_lists(len(ids))
            index, kind = build_ivf_index(self.dim, self.compression, lists), "ivf"
            index.train(training_sample(unit, lists))
            set_probes(index, self.probes)
        if len(ids):
            index.add_with_ids(unit, ids)
        self._index, self._index_kind, self._trained_count = index, kind, len(ids)
        self._indexed_revision, self._indexed_max_id = revision, int(ids.max()) if len(ids) else 0

    @property
    def index_kind(self) -> str | None:
        return self._index_kind

    # persistence -------------------------------------------------------------------------------------------------------
    def write_index_snapshot(self, directory: str | None = None) -> None:
        """Save the index (faiss's own format) with the revision it reflects, atomically, so a reopen skips the
        rebuild; a stale snapshot is ignored on open."""
        faiss = faiss_module()
        directory = self.directory if directory is None else str(directory)
        self.sync()
        index_path = os.path.join(directory, INDEX_FILE)
        faiss.write_index(self._index, index_path + ".tmp")
        _publish(index_path + ".tmp", index_path)
        meta = {"revision": self._indexed_revision, "max_id": self._indexed_max_id, "kind": self._index_kind,
                "trained_count": self._trained_count}
        _write_json_atomically(os.path.join(directory, INDEX_META_FILE), meta)

    def _read_index_snapshot(self) -> bool:
        meta_path = os.path.join(self.directory, INDEX_META_FILE)
        index_path = os.path.join(self.directory, INDEX_FILE)
        if not (os.path.isfile(meta_path) and os.path.isfile(index_path)):
            return False
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
        if meta["revision"] != self.revision():
            return False
        self._index = faiss_module().read_index(index_path)
        set_probes(self._index, self.probes)
        self._index_kind, self._trained_count = meta["kind"], meta["trained_count"]
        self._indexed_revision, self._indexed_max_id = meta["revision"], meta["max_id"]
        return True

    def save(self, directory: str) -> dict:
        """A consistent copy of the store in ``directory`` (SQLite's online backup, written to a temporary file and
        renamed) plus the index snapshot; returns what `load` needs besides the directory."""
        directory = str(directory)
        os.makedirs(directory, exist_ok=True)
        with self._write(changes_entries=False):  # the clock goes into the copy
            pass
        target = os.path.join(directory, DATABASE_FILE)
        _backup(self._connection, target)
        self.write_index_snapshot(directory)
        return {"database": DATABASE_FILE, "index": INDEX_FILE, "revision": self.revision(), "step": self.step,
                "episode": self.episode}

    @classmethod
    def load(cls, directory: str, path=None, **options) -> "IndexedMemoryStore":
        """Open a copy of the store saved in ``directory`` at ``path`` (None: a temporary directory), so the saved
        checkpoint itself is never written; the saved index is reused when it matches."""
        directory = str(directory)
        temporary = tempfile.TemporaryDirectory(prefix="reso_memory_") if path is None else None
        working = temporary.name if temporary is not None else str(path)
        os.makedirs(working, exist_ok=True)
        source = sqlite3.connect(os.path.join(directory, DATABASE_FILE))
        try:
            _backup(source, os.path.join(working, DATABASE_FILE))
        finally:
            source.close()
        for name in (INDEX_FILE, INDEX_META_FILE):
            if os.path.isfile(os.path.join(directory, name)):
                with open(os.path.join(directory, name), "rb") as handle:
                    _write_bytes_atomically(os.path.join(working, name), handle.read())
        store = cls(working, **options)
        if temporary is not None:
            store._temporary = temporary  # removed with the store
        store._read_index_snapshot()
        return store

    def close(self) -> None:
        self._connection.close()


class _WriteTransaction:
    """BEGIN IMMEDIATE ... COMMIT that bumps the revision and publishes the clock (the larger of this process's and
    the database's); rolled back on any exception, which propagates."""

    def __init__(self, store: IndexedMemoryStore, changes_entries: bool):
        self.store = store
        self.changes_entries = changes_entries  # False: the index need not look (e.g. access counts only)

    def __enter__(self):
        connection = self.store._connection
        connection.execute("BEGIN IMMEDIATE")
        self.revision = self.store._meta("revision", 0) + int(self.changes_entries)
        self.step = max(self.store.step, self.store._meta("step", 0))
        return self

    def __exit__(self, exc_type, exc, traceback):
        connection = self.store._connection
        if exc_type is not None:
            connection.execute("ROLLBACK")
            return False
        self.store._set_meta("revision", self.revision)
        self.store._set_meta("step", self.step)
        self.store._set_meta("episode", max(self.store.episode, self.store._meta("episode", 0)))
        connection.execute("COMMIT")
        self.store.step = self.step
        return False


def _backup(source: sqlite3.Connection, target_path: str) -> None:
    temporary = target_path + ".tmp"
    if os.path.exists(temporary):
        os.remove(temporary)
    target = sqlite3.connect(temporary)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode=DELETE")  # a self-contained file: no -wal beside it
    finally:
        target.close()
    _publish(temporary, target_path)


def _publish(temporary: str, path: str) -> None:
    """Give the finished temporary file the mode open() would (SQLite creates 0644) and rename it into place."""
    umask = os.umask(0o077)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    os.replace(temporary, path)


def _write_bytes_atomically(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as handle:
        handle.write(data)
    _publish(path + ".tmp", path)


def _write_json_atomically(path: str, document: dict) -> None:
    _write_bytes_atomically(path, json.dumps(document, indent=2).encode("utf-8"))
