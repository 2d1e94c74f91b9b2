"""Ingestion: corpus readers -> conditioning -> the Zarr feature store -> splits and shards.

- ``readers/``: one reader module per corpus (``cinc2021``, ``ptbxl``, ``wfdb_dir``,
  ``cpsc2021``, ``ludb``, ``code15``, ``numpy_arrays``), the ``Reader`` contract, the registry
  (``readers.registry.get_reader``), the record type, read options, units and the WFDB header
  parser; readers yield ``RawRecord`` (float32 mV) and raise ``RecordError``;
- ``conditioning``: ``condition`` makes the store's 500 Hz, 5 s, int16 µV segments;
- ``worker``: ``process_batch`` reads and conditions a batch of records (one Dask task);
- ``pipeline``: ``ingest``, the driver: lists, schedules, appends and commits in order;
- ``sent_files``: ``--send-bytes``, the driver ships each record's files to the workers;
- ``watch``: follow a folder and ingest each record once its files are complete;
- ``one_file``: ``read_one``, one record file outside any corpus (the query CLI's reader);
- ``splits``: record-level train/valid/test splits and gallery/probe assignment;
- ``shards``: a split of the store as WebDataset tar shards;
- ``synth``: synthetic cohorts in the CinC 2021 format.
"""

from ingestion.readers.record import RawRecord, RecordError

__all__ = ["RawRecord", "RecordError"]
