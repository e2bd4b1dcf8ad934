"""The scalable Temporal SMF memory (SPEC §3.7, issue 15): SQLite + ANN index store, knowledge graph, compression.

`store` and `ann` need only numpy and the standard library at import (faiss, the `memory` extra, and networkx are
imported when used); `backend` connects the store to ResoLLM's `update_memory` / `recall` / prefix slots.
"""
