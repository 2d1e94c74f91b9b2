"""Corpus readers: one module per corpus, the record type, read options, units and the registry.

Readers (``registry.READERS``: source name -> module; ``registry.get_reader(name)``):

- ``cinc2021`` (``cinc2021``): PhysioNet/CinC Challenge 2021, WFDB ``.hea`` + MATLAB v4 ``.mat``;
- ``ptbxl`` (``ptbxl``): PTB-XL, ``ptbxl_database.csv`` + the 500 Hz WFDB records;
- ``wfdb`` (``wfdb_dir``): any WFDB directory (any rate, lead names, multi-file records);
- ``cpsc2021`` (``cpsc2021``): CPSC 2021 paroxysmal AF challenge, ``data_<patient>_<record>``;
- ``ludb`` (``ludb``): Lobachevsky University ECG database 1.0.1;
- ``code15`` (``code15``): CODE-15%, PhysioNet Challenge 2025 header dialect;
- ``numpy`` (``numpy_arrays``): bring-your-own ``.npy`` / ``.npz`` arrays;
- ``muse`` (``muse``): GE MUSE RestingECG XML (limb leads III, aVR, aVL, aVF derived);
- ``philips`` (``philips``): Philips SierraECG / PhilipsECG XML (XLI through ``sierraecg``).

Shared by them: ``protocol`` (the ``Reader`` contract each module meets and the check of its
options), ``record`` (``RawRecord``, ``RecordError``), ``options`` (``ReadOptions``: bounds and
the path policy), ``units`` (signal and store units) and ``wfdb_header`` (the strict WFDB header
parser, data-file size check and ``.dat`` decoding). Readers never condition: that is
``ingestion.conditioning``.
"""
