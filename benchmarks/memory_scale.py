"""Scale of the indexed SMF memory (issue 15): 10^4, 10^5 and 10^6 entries.

Vectors: structured, not uniform noise (uniform random vectors in 256 dimensions have no neighbourhood structure
and are the known worst case of every ANN index; mean hidden states of texts are anisotropic and clustered). Each
vector is a draw from a mixture of 1,000 Gaussian clusters in a 32-dimensional latent space, mapped by one fixed random
linear map to the model's dimension (`ResoLLMConfig().hidden_size`, 256) plus isotropic noise of 0.1 per dimension.
Queries are fresh draws from the same mixture (not stored vectors). Seeded: the same command gives the same data.

Per size N and per compression level (fp32, fp16, int8 scalar quantiser, PQ with 4 dimensions per byte):
  - brute force: exact scan over the (compressed) codes (faiss flat / scalar-quantiser / PQ index),
  - index: IVF with 4 sqrt(N) lists (one k-means coarse quantiser per N, shared by the four levels), at several
    numbers of probed lists,
each with recall@10 against the exact fp32 top-10 by cosine, single-query latency p50/p99 (one query per call, one
thread), speed-up over the fp32 brute force's p50, and index bytes (serialised size: codes, ids, centroids,
codebooks) with the compression ratio of the codes. Then the store itself at fp16 (its default): insert time into
SQLite (transactions of 10^4), database size, index build time, and `recall` (strength 1 everywhere, so its ranking
is the cosine's) recall@10 and latency.

    nice -n 10 python benchmarks/memory_scale.py --queries 300 --brute_queries 50 --store_max 100000
                                                # writes results/memory_scale.{json,md,png} (the committed run)
    nice -n 10 python benchmarks/memory_scale.py --vectors random --sizes 10000 100000   # the worst case
    python benchmarks/memory_scale.py --sizes 10000 --queries 200       # a minute
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from faiss.contrib.ivf_tools import add_preassigned

import reso_hf
from reso_hf.memory.ann import (
    build_exact_index,
    build_ivf_index,
    compression_ratio,
    default_lists,
    faiss_module,
    index_code_bytes,
    normalise,
    set_probes,
    training_sample,
)
from reso_hf.memory.store import IndexedMemoryStore

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LEVELS = ("fp32", "fp16", "int8", "pq")
PROBES = (8, 16, 32, 64, 128)
LATENT_DIM, CLUSTERS, CLUSTER_SPREAD, NOISE = 32, 1000, 0.5, 0.1
K = 10


class VectorSource:
    """The seeded mixture described in the module docstring; rows are produced in chunks (10^6 x 256 is 1 GB).
    ``random=True``: isotropic Gaussian vectors instead, the worst case (no neighbourhood structure)."""

    def __init__(self, dim: int, seed: int = 0, random: bool = False):
        rng = np.random.default_rng(seed)
        self.dim, self.random = dim, random
        self.centres = rng.normal(size=(CLUSTERS, LATENT_DIM))
        self.mapping = rng.normal(size=(LATENT_DIM, dim)) / np.sqrt(LATENT_DIM)

    def draw(self, count: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if self.random:
            return rng.normal(size=(count, self.dim)).astype(np.float32)
        latent = self.centres[rng.integers(0, CLUSTERS, count)] + CLUSTER_SPREAD * rng.normal(size=(count, LATENT_DIM))
        return (latent @ self.mapping + NOISE * rng.normal(size=(count, self.dim))).astype(np.float32)

    def stored_unit(self, count: int) -> np.ndarray:
        """``count`` stored vectors scaled to unit length, filled in place chunk by chunk (one copy in memory: the
        10^6 size was killed for memory on the shared machine when chunks, their concatenation and the normalised
        copy coexisted)."""
        vectors = np.empty((count, self.dim), dtype=np.float32)
        for start in range(0, count, 100_000):
            stop = min(start + 100_000, count)
            vectors[start:stop] = normalise(self.draw(stop - start, seed=1 + start // 100_000))
        return vectors


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / truth.shape[1] for f, t in zip(found, truth)]))


def latencies_ms(search, queries: np.ndarray) -> tuple[float, float]:
    times = []
    for query in queries:
        start = time.perf_counter()
        search(query[None])
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_size(count: int, source: VectorSource, args, log) -> dict:
    faiss = faiss_module()
    size_started = time.perf_counter()
    dim = source.dim
    started = time.perf_counter()
    vectors = source.stored_unit(count)
    queries = normalise(source.draw(args.queries, seed=999))
    brute_queries = queries[: args.brute_queries]
    faiss.omp_set_num_threads(args.threads)
    exact = build_exact_index(dim, "fp32")
    exact.add_with_ids(vectors, np.arange(count, dtype=np.int64))
    _, truth = exact.search(queries, K)
    log(f"N={count}: data and ground truth in {time.perf_counter() - started:.0f} s")
    rows = []
    faiss.omp_set_num_threads(1)
    base_p50, base_p99 = latencies_ms(lambda q: exact.search(q, K), brute_queries)
    rows.append({"method": "brute force", "compression": "fp32", "probes": None, "recall_at_10": 1.0,
                 "p50_ms": base_p50, "p99_ms": base_p99, "speedup": 1.0, "index_bytes": index_code_bytes(exact),
                 "compression_ratio": 1.0, "build_s": None})
    log(f"  brute fp32: p50 {base_p50:.2f} ms p99 {base_p99:.2f} ms")
    del exact

    faiss.omp_set_num_threads(args.threads)
    lists = default_lists(count)
    started = time.perf_counter()
    trained = build_ivf_index(dim, "fp32", lists)
    trained.train(training_sample(vectors, lists))
    coarse_s = time.perf_counter() - started
    centroids = trained.quantizer.reconstruct_n(0, lists)
    started = time.perf_counter()
    _, assignment = trained.quantizer.search(vectors, 1)  # each vector's list, shared by the four levels
    assignment = np.ascontiguousarray(assignment[:, 0])
    coarse_s += time.perf_counter() - started
    log(f"  coarse quantiser ({lists} lists) trained and assigned in {coarse_s:.0f} s")
    del trained

    for level in LEVELS:
        ratio = compression_ratio(dim, level)
        if level != "fp32":
            faiss.omp_set_num_threads(args.threads)
            started = time.perf_counter()
            flat = build_exact_index(dim, level)
            if not flat.is_trained:
                flat.train(training_sample(vectors, lists))
            flat.add_with_ids(vectors, np.arange(count, dtype=np.int64))
            build_s = time.perf_counter() - started
            faiss.omp_set_num_threads(1)
            _, found = flat.search(brute_queries, K)
            p50, p99 = latencies_ms(lambda q: flat.search(q, K), brute_queries)
            rows.append({"method": "brute force", "compression": level, "probes": None,
                         "recall_at_10": recall_at_k(found, truth[: len(brute_queries)]), "p50_ms": p50, "p99_ms": p99,
                         "speedup": base_p50 / p50, "index_bytes": index_code_bytes(flat), "compression_ratio": ratio,
                         "build_s": build_s})
            log(f"  brute {level}: recall {rows[-1]['recall_at_10']:.3f} p50 {p50:.2f} ms")
            del flat
        faiss.omp_set_num_threads(args.threads)
        started = time.perf_counter()
        index = build_ivf_index(dim, level, lists)
        index.quantizer.add(centroids)  # the shared coarse quantiser: only the codes' quantiser is trained here
        index.train(training_sample(vectors, lists))
        ids = np.arange(count, dtype=np.int64)  # a name of its own: add_preassigned keeps only a raw pointer to it
        add_preassigned(index, vectors, assignment, ids)
        build_s = time.perf_counter() - started + coarse_s
        size = index_code_bytes(index)
        faiss.omp_set_num_threads(1)
        for probes in PROBES:
            set_probes(index, probes)
            _, found = index.search(queries, K)
            p50, p99 = latencies_ms(lambda q: index.search(q, K), queries)
            rows.append({"method": "IVF index", "compression": level, "probes": probes,
                         "recall_at_10": recall_at_k(found, truth), "p50_ms": p50, "p99_ms": p99,
                         "speedup": base_p50 / p50, "index_bytes": size, "compression_ratio": ratio, "build_s": build_s})
            log(f"  IVF {level} probes {probes}: recall {rows[-1]['recall_at_10']:.3f} p50 {p50:.3f} ms "
                f"({rows[-1]['speedup']:.0f}x)")
        del index
    store_row = measure_store(vectors, queries, truth, base_p50, args, log) if count <= args.store_max else None
    return {"entries": count, "lists": lists, "queries": len(queries), "brute_force_queries": len(brute_queries),
            "rows": rows, "store": store_row, "peak_rss_mb": peak_rss_mb(),
            "wall_s": time.perf_counter() - size_started}


def measure_store(vectors, queries, truth, base_p50, args, log) -> dict:
    """The store end to end at its default compression (fp16): SQLite inserts, index build, `recall`."""
    directory = tempfile.mkdtemp(prefix="memory_scale_", dir=args.workdir)
    try:
        store = IndexedMemoryStore(directory, dim=vectors.shape[1], decay_rate=0.0, capacity=len(vectors) + 1,
                                   prune_below=0.0, compression="fp16", probes=args.store_probes)
        started = time.perf_counter()
        chunk = 10_000
        for start in range(0, len(vectors), chunk):
            keys = vectors[start:start + chunk]
            store.add_many(keys, [f"entry {start + i}" for i in range(len(keys))], [1.0] * len(keys))
        insert_s = time.perf_counter() - started
        faiss_module().omp_set_num_threads(args.threads)
        started = time.perf_counter()
        store.sync()
        build_s = time.perf_counter() - started
        faiss_module().omp_set_num_threads(1)
        found = np.array([[r.entry_id - 1 for r, _ in store.recall(q, K, count_access=False)] for q in queries])
        p50, p99 = latencies_ms(lambda q: store.recall(q[0], K, count_access=False), queries)
        database_mb = os.path.getsize(os.path.join(directory, "reso_memory.sqlite")) / 2**20
        row = {"compression": "fp16", "probes": args.store_probes, "index": store.index_kind, "insert_s": insert_s,
               "inserts_per_s": len(vectors) / insert_s, "index_build_s": build_s, "database_mb": database_mb,
               "recall_at_10": recall_at_k(found, truth), "p50_ms": p50, "p99_ms": p99, "speedup": base_p50 / p50}
        log(f"  store: insert {insert_s:.0f} s, build {build_s:.0f} s, db {database_mb:.0f} MB, "
            f"recall {row['recall_at_10']:.3f}, p50 {p50:.2f} ms ({row['speedup']:.0f}x)")
        store.close()
        return row
    finally:
        shutil.rmtree(directory)


def best_index_row(size: dict, level: str, target: float) -> dict | None:
    """The fastest IVF row of a level that reaches ``target`` recall (else its most accurate row)."""
    rows = [r for r in size["rows"] if r["method"] == "IVF index" and r["compression"] == level]
    meeting = [r for r in rows if r["recall_at_10"] >= target]
    return min(meeting, key=lambda r: r["p50_ms"]) if meeting else max(rows, key=lambda r: r["recall_at_10"])


def markdown(report: dict) -> str:
    lines = [f"# Memory scale ({report['dim']} dimensions, {report['vectors']}; single-query latency, 1 thread)", ""]
    for size in report["sizes"]:
        lines += [f"## {size['entries']:,} entries ({size['lists']} IVF lists, {size['queries']} queries, "
                  f"brute force over {size['brute_force_queries']})", "",
                  "| method | compression | probes | recall@10 | p50 ms | p99 ms | speed-up | index MB | ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in size["rows"]:
            lines.append(f"| {r['method']} | {r['compression']} | {r['probes'] or '-'} | {r['recall_at_10']:.3f} | "
                         f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['speedup']:.1f}x | {r['index_bytes'] / 2**20:.1f} "
                         f"| {r['compression_ratio']:.0f}x |")
        s = size["store"]
        if s is None:
            lines += ["", f"Store not measured at this size (--store_max). Peak RSS {size['peak_rss_mb']:.0f} MB.", ""]
            continue
        lines += ["", f"Store (SQLite + {s['index']} index, fp16, {s['probes']} probes): insert {s['insert_s']:.1f} s "
                  f"({s['inserts_per_s']:,.0f}/s), index build {s['index_build_s']:.1f} s, database "
                  f"{s['database_mb']:.0f} MB, recall@10 {s['recall_at_10']:.3f}, p50 {s['p50_ms']:.2f} ms, "
                  f"p99 {s['p99_ms']:.2f} ms ({s['speedup']:.1f}x brute force). Peak RSS {size['peak_rss_mb']:.0f} MB.",
                  ""]
    return "\n".join(lines)


def figure(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = report["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for axis, size in zip(axes[0], sizes):
        for level in LEVELS:
            rows = [r for r in size["rows"] if r["method"] == "IVF index" and r["compression"] == level]
            axis.plot([r["speedup"] for r in rows], [r["recall_at_10"] for r in rows], marker="o", label=f"IVF {level}")
            for r in rows:
                axis.annotate(str(r["probes"]), (r["speedup"], r["recall_at_10"]), fontsize=6)
        axis.axhline(0.95, color="grey", linestyle=":")
        axis.axvline(50, color="grey", linestyle=":")
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel("speed-up over fp32 brute force (p50)")
        axis.set_ylabel("recall@10")
        axis.set_title(f"{size['entries']:,} entries")
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=reso_hf.ResoLLMConfig().hidden_size)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--brute_queries", type=int, default=100)
    parser.add_argument("--store_probes", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="faiss threads for building (queries use one); more threads than free cores make OpenMP "
                             "spin: on the shared 2-core machine the 10^4 size took 45 s with 1 thread, over 8 min with 2")
    parser.add_argument("--store_max", type=int, default=1_000_000, help="largest N also measured through the store")
    parser.add_argument("--workdir", default=None, help="where the store's database is built (default: temp)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the sizes already in the output JSON that this run does not measure")
    parser.add_argument("--vectors", choices=("structured", "random"), default="structured")
    parser.add_argument("--output", default=None, help="default: results/memory_scale (random: memory_scale_random)")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = os.path.join(RESULTS, "memory_scale" if args.vectors == "structured" else "memory_scale_random")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    source = VectorSource(args.dim, random=args.vectors == "random")
    description = ("structured: 1000-cluster Gaussian mixture in 32 latent dims, linear map, noise 0.1"
                   if args.vectors == "structured" else "random: isotropic Gaussian")
    report = {"dim": args.dim, "vectors": description, "k": K, "faiss": faiss_module().__version__, "cpu_count": os.cpu_count(), "sizes": []}

    def log(message):
        print(message, flush=True)

    if args.resume and os.path.isfile(args.output + ".json"):
        with open(args.output + ".json", encoding="utf-8") as handle:
            kept = json.load(handle)["sizes"]
        report["sizes"] = [size for size in kept if size["entries"] not in args.sizes]
    for count in args.sizes:
        report["sizes"].append(measure_size(count, source, args, log))
        report["sizes"].sort(key=lambda size: size["entries"])
        with open(args.output + ".json.tmp", "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        os.replace(args.output + ".json.tmp", args.output + ".json")
        with open(args.output + ".md.tmp", "w", encoding="utf-8") as handle:
            handle.write(markdown(report))
        os.replace(args.output + ".md.tmp", args.output + ".md")
        figure(report, args.output + ".png")
    for size in report["sizes"]:
        for level in LEVELS:
            row = best_index_row(size, level, 0.95)
            log(f"N={size['entries']} {level}: recall {row['recall_at_10']:.3f} at {row['speedup']:.0f}x "
                f"({row['probes']} probes)")


if __name__ == "__main__":
    sys.exit(main())
