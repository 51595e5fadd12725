"""Pruning methods, one module each: a dataclass subclassing :class:`~prunerep.compress.method.Pruner`
(settings as fields, capabilities as class flags, ``check`` and ``prune`` as methods). The
registry (:mod:`prunerep.registry`) finds them by scanning this package; see the README's
"Adding a method" for a worked example."""
from prunerep.compress.method import Pruner as BASE

__all__ = ["BASE"]
