"""Approximate-nearest-neighbour indexes over unit key vectors (inner product = cosine), built with faiss.

faiss is imported inside the functions: it is the optional `memory` extra, and importing reso_hf must not need it.
One builder serves the memory store and `benchmarks/memory_scale.py`, so the benchmark measures the store's index.

Compression levels of the vectors held in the index (bytes per vector for dimension d):
  "fp32": 4d (no compression), "fp16": 2d (scalar quantiser, 2x), "int8": d (8-bit scalar quantiser with per-dimension
  ranges trained on the data, 4x), "pq": product quantiser with d/`PQ_SUBVECTOR_DIM` sub-quantisers of 8 bits
  (index only; the memory store does not offer it because prefix slots need the keys themselves).
"""

import math

import numpy as np

COMPRESSIONS = ("fp32", "fp16", "int8", "pq")
PQ_SUBVECTOR_DIM = 4  # dimensions per PQ sub-quantiser: d/4 bytes a vector, a 16x compression of fp32
MAX_TRAINING_POINTS_PER_LIST = 40  # k-means sample per inverted list (faiss warns below 39)
KMEANS_ITERATIONS = 10  # faiss defaults to 25; past 10 the lists barely move and training is 2.5x slower
PQ_TRAINING_POINTS_PER_CENTROID = 64  # PQ codebooks (256 centroids per sub-quantiser) train on 16,384 points


def faiss_module():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("the indexed memory store needs faiss: pip install 'reso-hf[memory]'") from error
    return faiss


def check_compression(value, allowed=COMPRESSIONS, field_name="compression") -> str:
    if value not in allowed:
        raise ValueError(f"{field_name}={value!r} is invalid: expected one of {tuple(allowed)}")
    return value


def bytes_per_vector(dim: int, compression: str) -> int:
    """Bytes of one code in the index (the inverted lists' ids and the coarse centroids come on top)."""
    check_compression(compression)
    return {"fp32": 4 * dim, "fp16": 2 * dim, "int8": dim, "pq": dim // PQ_SUBVECTOR_DIM}[compression]


def compression_ratio(dim: int, compression: str) -> float:
    """fp32 bytes over compressed bytes per vector."""
    return 4 * dim / bytes_per_vector(dim, compression)


def default_lists(count: int) -> int:
    """Inverted lists of an IVF index over ``count`` vectors: about 4 sqrt(N), the usual rule of thumb."""
    return max(1, int(round(4 * math.sqrt(count))))


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero) as contiguous float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def _scalar_quantiser_type(faiss, compression: str):
    return {"fp16": faiss.ScalarQuantizer.QT_fp16, "int8": faiss.ScalarQuantizer.QT_8bit}[compression]


def build_exact_index(dim: int, compression: str):
    """Brute-force search over the (compressed) vectors, with 64-bit ids; nothing to train except int8's ranges."""
    faiss = faiss_module()
    check_compression(compression)
    metric = faiss.METRIC_INNER_PRODUCT
    if compression == "fp32":
        inner = faiss.IndexFlatIP(dim)
    elif compression == "pq":
        inner = faiss.IndexPQ(dim, dim // PQ_SUBVECTOR_DIM, 8, metric)
        _limit_pq_training(inner.pq)
    else:
        inner = faiss.IndexScalarQuantizer(dim, _scalar_quantiser_type(faiss, compression), metric)
    return faiss.IndexIDMap2(inner)


def build_ivf_index(dim: int, compression: str, lists: int):
    """Inverted-file index: k-means coarse quantiser with ``lists`` cells, codes at the given compression.
    A query visits `nprobe` cells (set with `set_probes`)."""
    faiss = faiss_module()
    check_compression(compression)
    metric = faiss.METRIC_INNER_PRODUCT
    coarse = faiss.IndexFlatIP(dim)
    if compression == "fp32":
        index = faiss.IndexIVFFlat(coarse, dim, lists, metric)
    elif compression == "pq":
        index = faiss.IndexIVFPQ(coarse, dim, lists, dim // PQ_SUBVECTOR_DIM, 8, metric)
        index.by_residual = True
        _limit_pq_training(index.pq)
    else:
        index = faiss.IndexIVFScalarQuantizer(coarse, dim, lists, _scalar_quantiser_type(faiss, compression), metric)
    index.cp.seed = 1234  # k-means initialisation: same data, same index
    index.cp.max_points_per_centroid = MAX_TRAINING_POINTS_PER_LIST
    index.cp.niter = KMEANS_ITERATIONS
    return index


def _limit_pq_training(product_quantiser) -> None:
    product_quantiser.cp.niter = KMEANS_ITERATIONS
    product_quantiser.cp.max_points_per_centroid = PQ_TRAINING_POINTS_PER_CENTROID


def training_sample(vectors: np.ndarray, lists: int, seed: int = 0) -> np.ndarray:
    """The rows k-means trains on: all of them up to `MAX_TRAINING_POINTS_PER_LIST` per list, else a seeded sample."""
    limit = MAX_TRAINING_POINTS_PER_LIST * lists
    if len(vectors) <= limit:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=limit, replace=False))
    return np.ascontiguousarray(vectors[rows])


def set_probes(index, probes: int) -> None:
    """Cells visited per query of an IVF index (ignored by exact indexes)."""
    faiss = faiss_module()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(probes, ivf.nlist)


def index_code_bytes(index) -> int:
    """Bytes held by the index: the serialised size, which counts codes, ids, centroids and codebooks."""
    faiss = faiss_module()
    return int(faiss.serialize_index(index).size)
