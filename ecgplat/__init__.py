"""ecgplat core, what every other package builds on: lead sets, label vocabularies, the feature
store and the shard format, pseudonymisation, locks and atomic writes, progress and run tracking;
and the command line (`ecgplat.cli`), the one part that composes every package."""

__version__ = "0.1.0"
