"""The indexed SMF memory (issue 15): SQLite + ANN store, knowledge graph, compression, the model path behind it,
persistence, concurrent and killed writers, fact verification."""

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch
from reso_test_models import micro_config

import reso_hf
from reso_hf.memory.ann import compression_ratio
from reso_hf.memory.store import DATABASE_FILE, IndexedMemoryStore, decode_key, encode_key
from reso_hf.modeling import state_reso_llm

DIM = 16
PACKAGE_DIR = os.path.dirname(os.path.abspath(reso_hf.__file__))
# Writer processes import the store without reso_hf (whose import costs seconds of transformers): the memory
# folder is a self-contained package that needs numpy and sqlite3 only.
WRITER = """
import os, sys, time, numpy as np
sys.path.insert(0, {package!r})
from memory.store import IndexedMemoryStore
store = IndexedMemoryStore({path!r}, dim={dim}, capacity=100000, decay_rate=0.0, prune_below=0.0, compression="fp32")
rng = np.random.default_rng({seed})
print("ready", flush=True)
while {start_file!r} and not os.path.exists({start_file!r}):  # start together with the other writer
    time.sleep(0.005)
for i in range({count}):
    entry = store.add(rng.normal(size={dim}), np.zeros(16), 1.0, "{name} %d" % i)
    print(entry.entry_id, flush=True)
    time.sleep({pause})  # the work a model does between two memories (SQLite's busy wait is not fair to a waiter)
"""


def new_store(path=None, **options):
    return IndexedMemoryStore(path, **{"dim": DIM, "decay_rate": 0.1, "capacity": 100, "prune_below": 0.01,
                                       "compression": "fp32", **options})


def rows(count, seed=0):
    return np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)


def orientation():
    return np.zeros(16, dtype=np.float32)


def test_strength_decays_for_episodic_entries_only_and_pruning_follows_the_threshold(tmp_path):
    store = new_store(tmp_path)
    keys = rows(3)
    episodic = store.add(keys[0], orientation(), 0.5, "an event")
    semantic = store.add(keys[1], orientation(), 0.5, "a fact", kind="semantic")
    store.advance(10)
    assert math.isclose(store.strength(episodic), 0.5 * math.exp(-0.1 * 11))
    assert store.strength(semantic) == 0.5  # semantic_decay_rate defaults to 0
    store.advance(30)  # 0.5 exp(-0.1 * 41) = 0.0083 < 0.01: the next write prunes the event
    store.add(keys[2], orientation(), 1.0, "later")
    assert [r.text for r in store.records()] == ["a fact", "later"]
    assert [r.text for r in store.records(kind="semantic")] == ["a fact"]


def test_consolidation_turns_often_recalled_episodes_into_semantic_memory(tmp_path):
    store = new_store(tmp_path)
    keys = rows(2, seed=4)
    often = store.add(keys[0], orientation(), 0.5, "recalled often")
    store.add(keys[1], orientation(), 0.5, "never recalled")
    for _ in range(3):
        store.recall(keys[0], k=1)
    assert store.consolidate(min_accesses=3) == [often.entry_id]
    assert [r.text for r in store.records(kind="semantic")] == ["recalled often"]
    store.advance(50)  # the episode left fades below the threshold; the consolidated one does not
    store.prune()
    assert [r.text for r in store.records()] == ["recalled often"]
    assert store.recall(keys[0], k=1, kind="semantic")[0][1] == pytest.approx(0.5, abs=1e-6)


def test_capacity_evicts_the_weakest_and_recall_ranks_by_cosine_times_strength(tmp_path):
    store = new_store(tmp_path, capacity=3)
    keys = rows(4, seed=1)
    for i, importance in enumerate((0.9, 0.2, 0.8, 0.7)):
        store.add(keys[i], orientation(), importance, f"entry {i}")
    assert sorted(r.text for r in store.records()) == ["entry 0", "entry 2", "entry 3"]
    query = keys[2] + 0.1 * keys[0]
    recalled = store.recall(query, k=3)
    expected = []
    for record in store.records():
        cosine = float(record.key @ query / (np.linalg.norm(record.key) * np.linalg.norm(query)))
        expected.append((cosine * store.strength(record), record.text))
    assert [r.text for r, _ in recalled] == [t for _, t in sorted(expected, reverse=True)]
    assert [s for _, s in recalled] == pytest.approx(sorted((s for s, _ in expected), reverse=True), abs=1e-6)
    assert [r.access_count for r in store.get([r.entry_id for r, _ in recalled])] == [1, 1, 1]


def test_ivf_index_beyond_exact_below_keeps_finding_stored_entries(tmp_path):
    store = new_store(tmp_path, capacity=10_000, decay_rate=0.0, prune_below=0.0, exact_below=400, probes=64)
    keys = rows(1_000, seed=2)
    ids = store.add_many(keys, [f"e{i}" for i in range(1_000)], [1.0] * 1_000)
    store.sync()
    assert store.index_kind == "ivf"
    hits = [store.recall(keys[i], k=1, count_access=False)[0][0].entry_id == ids[i] for i in range(0, 1_000, 50)]
    assert all(hits)
    store.add(keys[0] * -1, orientation(), 1.0, "opposite")  # incremental add to the trained index
    assert store.recall(keys[0] * -1, k=1)[0][0].text == "opposite"


@pytest.mark.parametrize("compression, ratio, tolerance", [("fp32", 1, 0.0), ("fp16", 2, 1e-3), ("int8", 4, 1e-2)])
def test_compression_round_trip_and_ratio(compression, ratio, tolerance):
    key = rows(1, seed=3)[0]
    blob, scale = encode_key(key, compression)
    assert len(blob) == 4 * DIM / ratio and compression_ratio(DIM, compression) == ratio
    assert np.abs(decode_key(blob, scale, compression) - key).max() <= tolerance * np.abs(key).max()
    assert compression_ratio(DIM, "pq") == 16


def test_knowledge_graph_traversal_and_cascade_with_pruned_entries(tmp_path):
    store = new_store(tmp_path)
    keys = rows(2)
    event = store.add(keys[0], orientation(), 0.5, "Ada met Charles in London",
                      relations=[("Ada", "met", "Charles"), ("Charles", "lives_in", "London")])
    store.add_relation("London", "capital_of", "England")
    assert store.related("Ada", depth=1) == [("Ada", "met", "Charles")]
    assert store.related("Ada", depth=2) == [("Ada", "met", "Charles"), ("Charles", "lives_in", "London")]
    assert store.path("Ada", "England") == [("Ada", "met", "Charles"), ("Charles", "lives_in", "London"),
                                            ("London", "capital_of", "England")]
    assert store.graph().number_of_edges() == 3
    store.advance(100)
    store.add(keys[1], orientation(), 1.0, "later")  # prunes the event and its triples
    assert store.get([event.entry_id]) == []
    assert store.triples() == [("London", "capital_of", "England", None)]
    with pytest.raises(ValueError, match=r"a relation must be \(subject, relation, object\)"):
        store.add_relation("Ada", "", "x")


def test_importance_sampling_follows_strength_and_is_reproducible(tmp_path):
    store = new_store(tmp_path, decay_rate=0.0)
    keys = rows(3)
    strong = store.add(keys[0], orientation(), 0.9, "strong")
    store.add(keys[1], orientation(), 0.1, "weak")
    store.add(keys[2], orientation(), 0.0, "zero")
    draws = [store.sample(1, seed=s)[0].text for s in range(400)]
    assert "zero" not in draws and 0.85 <= draws.count("strong") / 400 <= 0.95
    assert [r.entry_id for r in store.sample(2, seed=7)] == [r.entry_id for r in store.sample(2, seed=7)]
    assert strong.entry_id in {r.entry_id for r in store.sample(2, seed=0)}
    with pytest.raises(ValueError, match="count=3 exceeds the 2 entries with non-zero strength"):
        store.sample(3)


def test_bad_store_input_raises_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"temporal_smf.store_compression='pq' is invalid: expected one of"):
        new_store(tmp_path / "a", compression="pq")
    store = new_store(tmp_path / "b")
    with pytest.raises(ValueError, match="kind='procedural' is invalid"):
        store.add(rows(1)[0], orientation(), 1.0, "x", kind="procedural")
    with pytest.raises(ValueError, match=r"key must have 16 values and orientation 16, got 3 and 16"):
        store.add(np.ones(3), orientation(), 1.0, "x")
    with pytest.raises(ValueError, match="the memory store at .* has dim=16, this model wants 8"):
        new_store(tmp_path / "b", dim=8)
    with pytest.raises(ValueError, match=r"temporal_smf.store='faiss' is invalid: expected one of \('list', 'indexed'\)"):
        micro_config(temporal_smf={"enabled": True, "store": "faiss"})


def test_concurrent_writer_processes_do_not_corrupt_the_store(tmp_path):
    path = str(tmp_path / "shared")
    new_store(path, capacity=100_000, decay_rate=0.0, prune_below=0.0).close()
    start_file = str(tmp_path / "start")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER.format(package=PACKAGE_DIR, path=path, dim=DIM, seed=s,
                                                                      count=150, name=name, start_file=start_file,
                                                                      pause=0.003)],
                                stdout=subprocess.PIPE, text=True) for s, name in ((0, "first"), (1, "second"))]
    assert [w.stdout.readline() for w in writers] == ["ready\n", "ready\n"]
    open(start_file, "w").close()
    outputs = [w.communicate(timeout=60)[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0]
    first, second = ([int(line) for line in out.split()] for out in outputs)
    assert len(set(first + second)) == 300
    assert min(second) < max(first) and min(first) < max(second)  # the two really wrote at the same time
    store = new_store(path, capacity=100_000, decay_rate=0.0, prune_below=0.0)
    assert sqlite3.connect(os.path.join(path, DATABASE_FILE)).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    texts = sorted(r.text for r in store.records())
    assert texts == sorted([f"first {i}" for i in range(150)] + [f"second {i}" for i in range(150)])
    assert store.step == 300  # both clocks, merged through the database
    for record in store.records()[::30]:
        assert store.recall(record.key, k=1, count_access=False)[0][0].entry_id == record.entry_id


def test_a_killed_writer_loses_at_most_the_entry_being_written(tmp_path):
    path = str(tmp_path / "killed")
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(package=PACKAGE_DIR, path=path, dim=DIM, seed=0,
                                                                   count=100_000, name="entry", start_file="",
                                                                   pause=0)],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "ready\n"
    committed = [int(writer.stdout.readline()) for _ in range(25)]
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    writer.stdout.close()
    store = new_store(path, capacity=100_000, decay_rate=0.0, prune_below=0.0)
    assert sqlite3.connect(os.path.join(path, DATABASE_FILE)).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = [r.entry_id for r in store.records()]
    assert stored[: len(committed)] == committed  # every reported entry is intact, in order
    # Between two reports the writer can finish at most a few more commits while the parent reads; nothing is torn:
    assert stored == list(range(1, len(stored) + 1))
    assert all(r.text == f"entry {r.entry_id - 1}" and r.key.shape == (DIM,) for r in store.records())


# --- the model path ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return reso_hf.create_default_tokenizer()


def memory_model(tokenizer, store="indexed", seed=0, **smf):
    torch.manual_seed(seed)
    config = micro_config(vocab_size=len(tokenizer), temporal_smf={
        "enabled": True, "memory_decay_rate": 0.05, "max_moments": 50, "recall_k": 2, "store": store, **smf})
    model = reso_hf.ResoLLMForCausalLM(config).eval()
    model.attach_tokenizer(tokenizer)
    return model


FACTS = ["Paris is the capital of France.", "Bach wrote fugues.", "Water boils at 100 degrees.",
         "The meeting is at noon."]


def test_indexed_store_backs_update_memory_recall_and_prefix_slots(tokenizer):
    indexed, listed = memory_model(tokenizer), memory_model(tokenizer, store="list")
    assert isinstance(indexed.reso_state.memory, reso_hf.IndexedSMFMemory)
    for model in (indexed, listed):
        for i, fact in enumerate(FACTS):
            model.update_memory(fact, importance=1.0 - 0.1 * i)
    ids = torch.tensor([[5, 6, 7]])
    before = indexed(ids).logits
    recalled, recalled_list = indexed.recall("fugues"), listed.recall("fugues")
    # fp16 keys, exact index below 20,000 entries: the same ranking as the list store, scores to fp16 precision
    assert [e.text for e, _ in recalled] == [e.text for e, _ in recalled_list]
    assert [s for _, s in recalled] == pytest.approx([s for _, s in recalled_list], abs=1e-3)
    assert torch.allclose(indexed.reso_state.prefix_vectors(), listed.reso_state.prefix_vectors(), atol=1e-2)
    assert not torch.allclose(indexed(ids).logits, before)  # the recalled memories entered attention
    assert torch.allclose(indexed(ids).logits, listed(ids).logits, atol=1e-3)
    entry = indexed.update_memory("Ada met Charles.", kind="semantic", relations=[("Ada", "met", "Charles")])
    assert entry.kind == "semantic" and indexed.reso_state.memory.store.related("Ada") == [("Ada", "met", "Charles")]
    with pytest.raises(ValueError, match="relations need temporal_smf.store='indexed'"):
        listed.update_memory("Ada met Charles.", relations=[("Ada", "met", "Charles")])


def test_indexed_memory_reloads_exactly_through_save_pretrained(tmp_path, tokenizer):
    model = memory_model(tokenizer)
    for i, fact in enumerate(FACTS):
        model.update_memory(fact, importance=1.0 - 0.1 * i, kind="semantic" if i == 2 else "episodic")
    model.reso_state.memory.advance(7)
    model.recall("When is the meeting?")
    model.save_pretrained(tmp_path, save_memory=True)
    with open(tmp_path / "config.json", encoding="utf-8") as handle:
        saved = json.load(handle)["temporal_smf"]
    assert (saved["store"], saved["store_compression"]) == ("indexed", "fp16")
    umask = os.umask(0o022)
    os.umask(umask)
    memory_files = [DATABASE_FILE, "reso_memory.faiss", "reso_memory.faiss.json"]
    assert [os.stat(tmp_path / name).st_mode & 0o777 for name in memory_files] == [0o666 & ~umask] * 3
    plan = reso_hf.push_to_hub_folder(tmp_path, "user/reso-memory", dry_run=True)
    assert {name: reason for name, reason in plan.left_out if name in memory_files} == \
        dict.fromkeys(memory_files, "ResoLLM runtime memory (save_memory=True)")

    loaded = reso_hf.ResoLLMForCausalLM.from_pretrained(tmp_path).eval()
    loaded.attach_tokenizer(tokenizer)
    assert loaded.reso_state.memory.store.directory != str(tmp_path)  # the checkpoint is copied, never written
    assert loaded.reso_state.memory.step == model.reso_state.memory.step
    assert [m.entry_id for m in loaded.reso_state.memory_context] == [m.entry_id for m in model.reso_state.memory_context]
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    for query in ("fugues", "capital", "boiling water"):
        before, after = model.recall(query, k=3), loaded.recall(query, k=3)
        assert [(e.entry_id, e.text, e.kind, e.created_at, s) for e, s in after] == \
            [(e.entry_id, e.text, e.kind, e.created_at, s) for e, s in before]
        assert all(torch.equal(a.key, b.key) for (a, _), (b, _) in zip(after, before))


def test_indexed_store_needs_its_backend_with_a_clear_error(tokenizer, monkeypatch):
    monkeypatch.delitem(state_reso_llm.MEMORY_STORE_BACKENDS, "indexed")
    with pytest.raises(ValueError, match=r"temporal_smf.store='indexed' needs the reso_hf package with its memory extra"):
        memory_model(tokenizer)
    assert isinstance(memory_model(tokenizer, store="list").reso_state.memory, state_reso_llm.MemoryStore)


def test_store_module_imports_no_optional_dependency():
    code = (f"import sys; sys.path.insert(0, {PACKAGE_DIR!r}); import memory.store, memory.ann; "
            "print(sorted(m for m in ('faiss', 'networkx', 'torch', 'transformers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def _reference_log_likelihood(model, context, statement):
    ids = torch.tensor([context + statement])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].double()
    log_probs = torch.log_softmax(logits[len(context) - 1: -1], dim=-1)
    return float(log_probs[torch.arange(len(statement)), torch.tensor(statement)].sum())


def test_verify_statement_is_the_difference_of_two_log_likelihoods(tokenizer):
    model = memory_model(tokenizer)
    for fact in FACTS:
        model.update_memory(fact)
    statement = "Bach wrote fugues."
    result = reso_hf.verify_statement(model, statement, k=2)
    assert result["score"] == result["log_likelihood_with"] - result["log_likelihood_without"]
    assert result["evidence"] == [e.text for e, _ in model.reso_state.memory.recall(model.text_vector(statement), 2)]
    statement_ids = tokenizer(statement, add_special_tokens=False)["input_ids"]
    evidence_ids = tokenizer("\n".join(result["evidence"]) + "\n", add_special_tokens=False)["input_ids"]
    bos = model.config.bos_token_id
    assert result["log_likelihood_without"] == _reference_log_likelihood(model, [bos], statement_ids)
    assert result["log_likelihood_with"] == _reference_log_likelihood(model, [bos] + evidence_ids, statement_ids)
    assert result["score"] != 0.0
    given = model.verify_statement(statement, evidence=["Bach wrote fugues."])
    assert given["evidence"] == ["Bach wrote fugues."] and given["statement_tokens"] == len(statement_ids)
    with pytest.raises(ValueError, match="evidence must be a list of strings or None"):
        model.verify_statement(statement, evidence="Bach")


def test_generate_reports_fact_verification_when_memory_is_on(tokenizer):
    model = memory_model(tokenizer, store="list")
    prompt = torch.tensor([tokenizer("Bach")["input_ids"]])
    empty = model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert empty.fact_verification == [None]  # nothing to verify against yet
    for fact in FACTS:
        model.update_memory(fact)
    out = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    report = out.fact_verification[0]
    generated = out.sequences[0, prompt.shape[1]:].tolist()
    assert report == model.verify_statement(generated)
    assert report["score"] == report["log_likelihood_with"] - report["log_likelihood_without"]
    off = reso_hf.ResoLLMForCausalLM(micro_config(vocab_size=len(tokenizer))).eval()
    plain = off.generate(prompt, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert plain.fact_verification == [None]
