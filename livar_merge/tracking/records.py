"""What the trackers record, computed from the rows a run folder holds (pure functions; the one
home of the tag names, which are valid in every tracker: letters, digits, ``_ - . /``).

A round ``r`` of a run (:func:`round_scalars`, :func:`round_histograms`):

==================================  =========================================================
``round/<column>``                  every number of ``metrics.csv``'s row (``test_accuracy``,
                                    ``test_loss``, seconds, reply counts, ...)
``paired/<method>/<column>``        ``paired.csv``: each paired method's top-1, loss and
                                    ``difference`` (its top-1 minus the run's)
``client/<id>/<column>``            ``clients.csv``: training loss/accuracy, steps, samples,
                                    upload and statistics bytes; ``download_bytes`` from
                                    ``replies.csv`` (Flower)
``client/<id>/<column>_mean``       ``alpha.csv`` over the client's layers: ``weight`` (alpha),
                                    ``omega_a``/``omega_b`` and their table bins
                                    ``bin_a``/``bin_b`` (the omega quantile cells)
``client/<id>/omega_{a,b}_pct_mean``  the mean over the client's layers of each omega's
                                    percentile in the round's pool (all clients and layers)
``head/weight_spread``              ``head_weights.csv``: mean over classes of the largest minus
                                    the smallest client weight of the class
``client/<id>/alpha`` (histogram)   the client's alpha per layer
==================================  =========================================================

A calibration (:func:`calibration_scalars`): ``calibration/seconds/<stage>``,
``calibration/forest/...`` (R^2 and the other forest metrics), ``calibration/shap_trend/<feature>``,
``calibration/quality/<table>/<column>`` and ``calibration/downstream/...``: every number of
``summary.json`` under those keys.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

SKIP = {"round", "participants", "client", "node_id", "method", "layer", "class", "accepted"}
ALPHA_COLUMNS = ("weight", "omega_a", "omega_b", "bin_a", "bin_b")


def tag(*parts: Any) -> str:
    """``parts`` joined by ``/``, characters no tracker accepts replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", "/".join(str(p) for p in parts))


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None (text, missing, NaN, booleans)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _of_round(rows: Iterable[Mapping[str, Any]], r: int) -> list[Mapping[str, Any]]:
    return [row for row in rows if int(row["round"]) == r]


def _numbers(prefix: tuple[Any, ...], row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of ``row`` (identifying columns left out) tagged ``prefix/<column>``."""
    return {
        tag(*prefix, k): x for k, v in row.items() if k not in SKIP and (x := number(v)) is not None
    }


def round_scalars(rows: Any, r: int) -> dict[str, float]:
    """The scalars of round ``r`` of a run's rows (a ``RunRows``)."""
    out: dict[str, float] = {}
    for row in _of_round(rows.metrics, r):
        out.update(_numbers(("round",), row))
    for row in _of_round(rows.paired, r):
        out.update(_numbers(("paired", row["method"]), row))
    for row in _of_round(rows.clients, r):
        out.update(_numbers(("client", row["client"]), row))
    for row in _of_round(rows.replies, r):
        if row.get("accepted") and (x := number(row.get("download_bytes"))) is not None:
            out[tag("client", row["client"], "download_bytes")] = x
    by_client: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in _of_round(rows.alpha, r):
        for column in ALPHA_COLUMNS:
            if (x := number(row.get(column))) is not None:
                by_client[str(row["client"])][column].append(x)
    for client, columns in by_client.items():
        for column, values in columns.items():
            out[tag("client", client, f"{column}_mean")] = float(np.mean(values))
    for side in ("omega_a", "omega_b"):  # each (client, layer)'s percentile in the round's pool
        pooled = [(c, x) for c, columns in by_client.items() for x in columns.get(side, [])]
        if pooled:
            ranks = percentiles(np.asarray([x for _, x in pooled]))
            for client in by_client:
                mine = [p for (c, _), p in zip(pooled, ranks, strict=True) if c == client]
                out[tag("client", client, f"{side}_pct_mean")] = float(np.mean(mine))
    by_class: dict[Any, list[float]] = defaultdict(list)
    for row in _of_round(rows.head_weights, r):
        if (x := number(row.get("weight"))) is not None:
            by_class[row["class"]].append(x)
    if by_class:
        out["head/weight_spread"] = float(np.mean([max(v) - min(v) for v in by_class.values()]))
    return out


def percentiles(omega: np.ndarray) -> np.ndarray:
    """Each entry's percentile rank (0-100: the share of the pooled ``omega`` at or below it),
    the position LIVAR's table edges cut (paper Appendix A)."""
    pooled = np.sort(np.ravel(omega))
    return 100.0 * np.searchsorted(pooled, omega, side="right") / pooled.size


def round_histograms(rows: Any, r: int) -> dict[str, np.ndarray]:
    """Per client, its alpha over the layers in round ``r``."""
    weights: dict[str, list[float]] = defaultdict(list)
    for row in _of_round(rows.alpha, r):
        if (x := number(row.get("weight"))) is not None:
            weights[str(row["client"])].append(x)
    return {tag("client", c, "alpha"): np.asarray(v) for c, v in weights.items()}


def numeric_leaves(prefix: tuple[str, ...], value: Any) -> dict[str, float]:
    """Every finite number in the nested dicts ``value``, tagged by its path under ``prefix``."""
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for k, v in value.items():
            out.update(numeric_leaves((*prefix, str(k)), v))
        return out
    x = number(value)
    return {} if x is None else {tag(*prefix): x}


CALIBRATION_KEYS = {
    "timings_seconds": "seconds",
    "forest_metrics": "forest",
    "shap_trend_spearman": "shap_trend",
    "quality_summary": "quality",
    "downstream": "downstream",
}


def calibration_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a calibration's ``summary.json`` (module docstring)."""
    out: dict[str, float] = {}
    for key, name in CALIBRATION_KEYS.items():
        out.update(numeric_leaves(("calibration", name), summary.get(key)))
    return out
