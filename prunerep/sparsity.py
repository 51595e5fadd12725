"""What a pruner is asked to do: a ratio in [0, 1) or an N:M pattern. Parse, label, sort.
A leaf: depends on nothing in prunerep but its errors."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from prunerep.errors import ConfigError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsitySpec:
    """A ratio of weights set to zero, or n zeros in every m consecutive weights."""

    ratio: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"


def parse_sparsity(value: Any) -> SparsitySpec:
    """`0.5`, `"0.37"`, `"2:4"` -> SparsitySpec; anything else raises ConfigError."""
    if isinstance(value, bool):
        raise ConfigError(f"sparsity={value!r} is not a number or an N:M pattern")
    if isinstance(value, str):
        mt = _NM.match(value)
        if mt:
            n, m = int(mt.group(1)), int(mt.group(2))
            if not (0 < n < m):
                raise ConfigError(
                    f"sparsity={value!r}: an N:M pattern needs 0 < N < M (N zeros in every M weights), e.g. 2:4")
            return SparsitySpec(ratio=n / m, n=n, m=m)
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(
                f"sparsity={value!r} is neither a ratio in [0, 1) nor an N:M pattern like 2:4") from None
    if isinstance(value, (int, float)):
        ratio = float(value)
        if not (0.0 <= ratio < 1.0):
            raise ConfigError(f"sparsity={value!r} is outside [0, 1): it is the fraction of weights set to zero")
        return SparsitySpec(ratio=ratio)
    raise ConfigError(f"sparsity={value!r} is neither a ratio in [0, 1) nor an N:M pattern like 2:4")


def sparsity_label(value: Any) -> str:
    """Canonical text of a sparsity value: 0.5, "0.50" and "5e-1" read "0.5"; " 2 : 4 " reads
    "2:4". A value that is not a valid sparsity comes back as its text."""
    try:
        return str(parse_sparsity(value))
    except ConfigError:
        return str(value).strip()


def sparsity_key(value: Any) -> tuple[float, int, str]:
    """Sort key: the ratio, unstructured before N:M at the same ratio, then the text."""
    s = str(value).strip()
    if ":" in s:
        try:
            n, m = (int(x) for x in s.split(":"))
            return (n / m, 1, s)
        except ValueError:
            return (math.inf, 2, s)
    try:
        return (float(s), 0, s)
    except ValueError:
        return (math.inf, 2, s)
