"""The probe table, built column by column: :class:`Rows` turns per-row metric tensors into the
tidy long table of the results contract (:data:`prunerep.results.schema.PROBE_COLUMNS`)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from torch import Tensor

from prunerep.probes.prompts import Prompt
from prunerep.results.schema import (ANSWER_METRICS, ESTIMATE_RATIOS, PROBE_COLUMNS, PROBE_DTYPES,
                                     empty_probe_table)

_LABELS = ("context", "prompt_id", "prompt_kind", "layer", "sublayer", "space", "metric", "temperature")


class Rows:
    """Columnar accumulator: each `add` appends one vector of values sharing its labels."""

    def __init__(self):
        self.labels: list[tuple] = []
        self.steps: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def add(self, context: str, prompt: Prompt, layer: int, sublayer: str, space: str, metric: str,
            temperature: float, steps, values) -> None:
        values = np.atleast_1d(np.asarray(values, dtype=np.float64))
        steps = np.broadcast_to(np.asarray(steps, dtype=np.int32), values.shape)
        self.labels.append((context, prompt.id, prompt.kind, layer, sublayer, space, metric, temperature))
        self.steps.append(steps)
        self.values.append(values)

    def add_metrics(self, context: str, prompt: Prompt, layer: int, sublayer: str,
                    per_row: dict[tuple[str, str, float], Tensor], steps=None) -> None:
        """``steps=None``: mean over rows (step -1); else one table row per metric row."""
        for (space, metric, t), v in per_row.items():
            v = v.numpy()
            if steps is None:
                self.add(context, prompt, layer, sublayer, space, metric, t, -1, v.mean() if v.size else math.nan)
            else:
                self.add(context, prompt, layer, sublayer, space, metric, t, steps, v)

    def add_estimate_ratios(self, context: str, prompt: Prompt, layer: int,
                            per_row: dict[tuple[str, str, float], Tensor], steps) -> None:
        """Per row (prompt position or decoding step: ``steps``), the second-order estimate over
        the exact value it estimates, :data:`~prunerep.results.schema.ESTIMATE_RATIOS`, at every
        temperature; rows where the exact value is 0 (p_pruned == p_dense: the ratio is undefined)
        are left out."""
        steps = np.asarray(steps)
        for name, (est, exact) in ESTIMATE_RATIOS.items():
            for (space, metric, t), v in per_row.items():
                if space != "probability" or metric != exact or (space, est, t) not in per_row:
                    continue
                x, e = v.numpy(), per_row[(space, est, t)].numpy()
                keep = x != 0
                if keep.any():
                    with np.errstate(divide="ignore", invalid="ignore"):
                        self.add(context, prompt, layer, "block", "probability", name, t, steps[keep],
                                 e[keep] / x[keep])

    def add_answer(self, prompt: Prompt, layer: int, position: int, options: dict,
                   per_row: dict[tuple[str, str, float], Tensor]) -> None:
        """A multiple-choice prompt's answer position at one layer: the option subspace
        (``options``: ``{(metric, T): value}``) and, from the same row, the full vocabulary
        (space ``answer``: :data:`~prunerep.results.schema.ANSWER_METRICS`)."""
        for (metric, t), v in options.items():
            self.add("prompt", prompt, layer, "block", "options", metric, t, position, v)
        for (space, metric, t), v in per_row.items():
            if space == "probability" and metric in ANSWER_METRICS:
                self.add("prompt", prompt, layer, "block", "answer", metric, t, position, float(v[position]))

    def frame(self) -> pd.DataFrame:
        if not self.labels:
            return empty_probe_table()
        lengths = np.array([len(v) for v in self.values])
        cols = list(zip(*self.labels))
        data = {}
        for name, col in zip(_LABELS, cols):
            data[name] = np.repeat(np.asarray(col, dtype=object if isinstance(col[0], str) else None), lengths)
        data["step"] = np.concatenate(self.steps)
        data["value"] = np.concatenate(self.values)
        df = pd.DataFrame(data)
        return df.astype({c: t for c, t in PROBE_DTYPES.items() if t != "object"})[list(PROBE_COLUMNS)]
