"""Ingestion: corpus readers -> conditioning -> the Zarr feature store and WebDataset shards.

Readers (``cinc2021``, ``ptbxl``, ``wfdb_dir``, ``cpsc2021``; registry in ``corpora``) yield
``record.RawRecord``; ``conditioning.condition`` makes the store's 500 Hz, 5 s, int16 µV
segments; ``synth`` writes synthetic cohorts in the CinC 2021 format.
"""

from ingestion.readers.record import RawRecord, RecordError

__all__ = ["RawRecord", "RecordError"]
