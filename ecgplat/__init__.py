"""ecgplat core: configuration, lead sets, label vocabularies, store schema, tracking, the CLI."""

__version__ = "0.1.0"
