"""Corpus readers: one module per corpus, the record type, read options, units and the registry."""
