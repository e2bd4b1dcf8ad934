"""Why the indexed memory uses faiss: faiss IVF against usearch's HNSW on the memory_scale data (issue 15).

Both at fp16, one thread, the structured vectors of `memory_scale.py` at the model's dimension; recall@10 against the
exact fp32 top-10, single-query latency, build time, index bytes. usearch is not a dependency: install it to run this
(`pip install usearch`; 2.26.6 also needs `numkong`). hnswlib 0.8.0 has no wheel for Python 3.11 (an sdist that
needs a C++ build) and no compression, so it is not measured.

    nice -n 10 python benchmarks/memory_ann_choice.py --entries 100000   # writes results/memory_ann_choice.json
"""

import argparse
import json
import os
import time

import numpy as np
from memory_scale import RESULTS, K, VectorSource, latencies_ms, recall_at_k

import reso_hf
from reso_hf.memory.ann import build_exact_index, build_ivf_index, default_lists, faiss_module, normalise, set_probes
from reso_hf.memory.ann import index_code_bytes, training_sample


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--dim", type=int, default=reso_hf.ResoLLMConfig().hidden_size)
    args = parser.parse_args(argv)
    faiss = faiss_module()
    faiss.omp_set_num_threads(1)
    import usearch
    from usearch.index import Index

    source = VectorSource(args.dim)
    vectors = source.stored_unit(args.entries)
    queries = normalise(source.draw(args.queries, seed=999))
    ids = np.arange(args.entries, dtype=np.int64)
    exact = build_exact_index(args.dim, "fp32")
    exact.add_with_ids(vectors, ids)
    _, truth = exact.search(queries, K)
    brute_p50, _ = latencies_ms(lambda q: exact.search(q, K), queries[:50])
    rows = []

    lists = default_lists(args.entries)
    started = time.perf_counter()
    ivf = build_ivf_index(args.dim, "fp16", lists)
    ivf.train(training_sample(vectors, lists))
    ivf.add_with_ids(vectors, ids)
    build_s = time.perf_counter() - started
    for probes in (16, 32):
        set_probes(ivf, probes)
        _, found = ivf.search(queries, K)
        p50, p99 = latencies_ms(lambda q: ivf.search(q, K), queries)
        rows.append({"library": f"faiss {faiss.__version__}", "index": f"IVF{lists},SQfp16 probes {probes}",
                     "build_s": build_s, "recall_at_10": recall_at_k(found, truth), "p50_ms": p50, "p99_ms": p99,
                     "speedup": brute_p50 / p50, "index_mb": index_code_bytes(ivf) / 2**20, "delete": "remove_ids"})
        print(rows[-1], flush=True)

    started = time.perf_counter()
    hnsw = Index(ndim=args.dim, metric="ip", dtype="f16", connectivity=16, expansion_add=128, expansion_search=64)
    hnsw.add(ids, vectors, threads=1)
    build_s = time.perf_counter() - started
    for expansion in (64, 128):
        hnsw.expansion_search = expansion
        found = hnsw.search(queries, K, threads=1).keys
        p50, p99 = latencies_ms(lambda q: hnsw.search(q[0], K, threads=1), queries)
        rows.append({"library": f"usearch {usearch.__version__}", "index": f"HNSW M16 f16 ef {expansion}",
                     "build_s": build_s, "recall_at_10": recall_at_k(np.asarray(found), truth), "p50_ms": p50,
                     "p99_ms": p99, "speedup": brute_p50 / p50, "index_mb": hnsw.memory_usage / 2**20,
                     "delete": "remove (marks)"})
        print(rows[-1], flush=True)
    with open(os.path.join(RESULTS, "memory_ann_choice.json"), "w", encoding="utf-8") as handle:
        json.dump({"entries": args.entries, "dim": args.dim, "queries": args.queries, "brute_p50_ms": brute_p50,
                   "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
