"""prunerep: when does pruning work? Follow the damage through h -> z -> p."""
__version__ = "0.1.0"
