"""Registry of corpus readers: source name -> module with ``list_records`` and ``read_record``."""

from __future__ import annotations

from types import ModuleType

from ingestion import cinc2021, code15, cpsc2021, ludb, numpy_arrays, ptbxl, wfdb_dir

CORPORA: dict[str, ModuleType] = {
    "cinc2021": cinc2021,
    "ptbxl": ptbxl,
    "wfdb": wfdb_dir,
    "cpsc2021": cpsc2021,
    "ludb": ludb,
    "code15": code15,
    "numpy": numpy_arrays,
}


def get_corpus(name: str) -> ModuleType:
    """The reader module for ``name``; ValueError listing the known corpora otherwise."""
    try:
        return CORPORA[name]
    except KeyError:
        raise ValueError(f"unknown corpus {name!r} (known: {', '.join(CORPORA)})") from None
