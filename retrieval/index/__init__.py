"""FAISS gallery indexes over L2-normalised embeddings, saved with their id mapping and lineage.

Similarity is the inner product of unit vectors, i.e. cosine similarity (the paper-era
identification score, docs/method.md §6.2). Kinds:

* `flat`  exact `IndexFlatIP` (default; same neighbours as a brute-force similarity matrix);
* `hnsw`  `IndexHNSWFlat` (graph search, no training) for large galleries;
* `ivf`   `IndexIVFFlat` over a flat inner-product coarse quantizer (k-means trained).

Approximate kinds report their recall@1 against exact search on a sample of queries at build
time (`GalleryIndex.info["recall_at_1"]`). Search runs on a GPU copy when FAISS sees a GPU,
else on the CPU. On disk an index is one file, `NAME.faiss`: FAISS's own serialisation followed
by its description (row ids, patient keys, lineage, build info) and a trailer, so the vectors and
their description are replaced together by one atomic rename (layout: docs/formats.md, "FAISS
index"). `ecgplat index update` does not rewrite that file: it writes the new rows as a small
exact delta segment `NAME.faiss.delta-NNNNNN` chained to it (`update_index`); `load` reads the
main file and its deltas, `search` merges their top-k, and once the deltas exceed a fraction of
the main a compaction folds them into a new main file. Queries whose embeddings come from another
lineage are refused.

Modules: `gallery` (`GalleryIndex`: search, add, save, load, delta segments), `build`
(`build_index`, `index_from_features`), `deltas` (`update_index`, `compact_index`), `forget`
(`ForgetIndex`), `file` (the index file's names, framing and lock). The public names are
re-exported here.
"""

from retrieval.index.build import (
    ADD_ROWS,
    build_index,
    default_params,
    index_from_features,
    recall_at_1,
)
from retrieval.index.deltas import (
    COMPACT_FRACTION,
    compact_index,
    update_from_features,
    update_index,
)
from retrieval.index.file import (
    DELTA_FORMAT,
    INDEX_KINDS,
    META_FORMAT,
    delta_file,
    index_file,
    index_lock,
)
from retrieval.index.forget import ForgetIndex
from retrieval.index.gallery import (
    GalleryIndex,
    StaleIndexError,
    check_forget_generation,
    check_lineage,
)
from retrieval.lineage import LineageError

__all__ = [
    "ADD_ROWS",
    "COMPACT_FRACTION",
    "DELTA_FORMAT",
    "INDEX_KINDS",
    "META_FORMAT",
    "ForgetIndex",
    "GalleryIndex",
    "LineageError",
    "StaleIndexError",
    "build_index",
    "check_forget_generation",
    "check_lineage",
    "compact_index",
    "default_params",
    "delta_file",
    "index_file",
    "index_from_features",
    "index_lock",
    "recall_at_1",
    "update_from_features",
    "update_index",
]
