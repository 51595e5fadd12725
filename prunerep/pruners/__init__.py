"""Pruning methods, one module each: a dataclass subclassing :class:`~prunerep.pruners.common.Pruner`
(settings as fields, capabilities as class flags, ``check`` and ``prune`` as methods). The
registry (:mod:`prunerep.registry`) finds them by scanning this package; see the README's
"Adding a method" for a worked example."""
from prunerep.pruners.common import Pruner as BASE  # the class every method here derives from

__all__ = ["BASE"]
