"""Retrieval: ECG embeddings in the feature store, FAISS gallery indexes, identification
evaluation, similar-ECG queries.

Modules: `features` (the feature-set format and read API: `FeatureSet`, `open_features`),
`feature_build` (a feature set's write protocol: plan, commit, publish), `embed` (the embedding
run, `embed_store`: embeddings of every stored ECG into `features/<name>`, with lineage),
`feature_publish` (a set embedded from a published store, uploaded into it), `model`
(`LoadedModel`: a checkpoint's encoder loaded once), `lineage` (`Lineage`: the match keys and
comparisons of two lineages), `index` (package: FAISS flat/HNSW/IVF gallery index saved with ids
and lineage, its build, delta updates and compaction, forget, on-disk file), `evaluate`
(gallery/probe identification per record and per segment), `query` (nearest gallery ECGs of a
stored record or of new conditioned signals, and their plot), `stream` (the append path of
`ecgplat watch`), `figures` (saving the plots).

This package may import `ecgplat` and `training`, never `ingestion` (docs/ARCHITECTURE.md).
"""
