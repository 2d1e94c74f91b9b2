"""ecgplat core: configuration, lead sets, label vocabularies, the feature-store schema, tracking and the CLI."""

__version__ = "0.1.0"
