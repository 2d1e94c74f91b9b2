"""Retrieval: ECG embeddings in the feature store, FAISS gallery indexes, identification metrics
and evaluation, similar-ECG queries.

Modules: `embed` (embeddings of every stored ECG into `features/<name>`, with lineage),
`index` (FAISS flat/HNSW/IVF gallery index saved with ids and lineage), `metrics` (Rank-k, CMC,
mAP), `evaluate` (gallery/probe identification per record and per segment), `query` (nearest
gallery ECGs of a stored record or of new conditioned signals, and their plot), `figures`
(saving the plots).

This package may import `ecgplat` and `training`, never `ingestion` (docs/ARCHITECTURE.md).
"""
