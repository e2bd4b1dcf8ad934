"""WaveGen: a cache of generated continuations keyed by prompt, decoding settings and adapter provenance
(issue 14; dynamic-lora-roadmap Phase 5). See `cache.py` for the key, the invalidation rule and the migration signal,
`fingerprint.py` for the components of a model and their hashes."""

from .cache import CACHE_FILE, EVICTION_POLICIES, WaveGenCache, WaveGenEntry, cached_generate
from .fingerprint import ComponentHasher, adapter_component, tier_component, tier_of

__all__ = [
    "CACHE_FILE",
    "EVICTION_POLICIES",
    "ComponentHasher",
    "WaveGenCache",
    "WaveGenEntry",
    "adapter_component",
    "cached_generate",
    "tier_component",
    "tier_of",
]
