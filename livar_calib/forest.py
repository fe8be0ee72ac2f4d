"""Random forest from importance features to NNLS coefficients (paper Sec. 4.1, Appendix B).

The forest predicts lambda_m^l (Eq. 4) from the quantile features ``q_a``, ``q_b`` (optionally
also ``num_samples``, the paper's Appendix B check). Error figures are honest: whole repeats are
held out, never individual rows, because rows of one repeat share the quantile pool and the
joint model; by default whole (beta, seed) runs are held out, because the rounds of one run
share its partition and trajectory (:mod:`livar_calib.intervals`). Defaults keep exact SHAP
affordable: ``min_samples_leaf=20`` makes TreeExplainer on 5,000 rows take seconds instead of
minutes (fully grown trees: ~230 s on 2 cores).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from livar_calib.features import check_rows
from livar_calib.intervals import run_of, split_runs, t_interval
from livar_merge.errors import CalibrationError

if TYPE_CHECKING:
    import pandas as pd
    from sklearn.ensemble import RandomForestRegressor

DEFAULT_FEATURES = ("q_a", "q_b")
WITH_SAMPLES = ("q_a", "q_b", "num_samples")


@dataclass(frozen=True)
class ForestSettings:
    """The forest's hyper-parameters, one declaration for :func:`fit_forest` and
    :func:`cross_validated_r2`: ``RandomForestRegressor(random_state=seed, ...)``; ``seed``
    also draws the held-out runs; ``n_jobs``: 1 or 2 (the development machines have 2 cores;
    predictions always run on one thread, in tree order, so results do not depend on it)."""

    seed: int = 0
    n_estimators: int = 200
    min_samples_leaf: int = 20
    max_depth: int | None = None
    n_jobs: int = 1

    def regressor(self) -> RandomForestRegressor:
        from sklearn.ensemble import RandomForestRegressor

        return RandomForestRegressor(
            n_estimators=self.n_estimators,
            min_samples_leaf=self.min_samples_leaf,
            max_depth=self.max_depth,
            random_state=self.seed,
            n_jobs=self.n_jobs,
        )


@dataclass
class ForestResult:
    """A fitted forest and its held-out error.

    Attributes:
        model: the fitted ``sklearn.ensemble.RandomForestRegressor`` (trained on ``train_repeats``).
        features, target: column names used.
        train_repeats, test_repeats: repeat ids of each side (disjoint).
        metrics: ``r2``, ``mae`` of the forest and ``r2_constant``, ``mae_constant`` of the
            training-mean predictor on the held-out rows (NaN without held-out repeats), plus
            ``n_train``, ``n_test`` row counts, ``test_runs`` and the mean within-run R^2 of the
            held-out runs with its t interval over runs (``r2_by_run``, ``r2_by_run_low``,
            ``r2_by_run_high``; NaN below 3 runs).
    """

    model: RandomForestRegressor
    features: tuple[str, ...]
    target: str
    train_repeats: list[str]
    test_repeats: list[str]
    metrics: dict[str, float] = field(default_factory=dict)

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        """Forest prediction ``[n]`` for ``rows`` (must hold the feature columns)."""
        check_rows(rows, self.features)
        return self.model.predict(rows.loc[:, list(self.features)])


def _metrics(y_true: np.ndarray, y_pred: np.ndarray, constant: float) -> dict[str, float]:
    from sklearn.metrics import mean_absolute_error, r2_score

    if y_true.size == 0:
        nan = float("nan")
        return {"r2": nan, "mae": nan, "r2_constant": nan, "mae_constant": nan}
    const = np.full_like(y_true, constant)
    return {
        "r2": float(r2_score(y_true, y_pred)) if y_true.size > 1 else float("nan"),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "r2_constant": float(r2_score(y_true, const)) if y_true.size > 1 else float("nan"),
        "mae_constant": float(mean_absolute_error(y_true, const)),
    }


def _r2_by_run(repeats: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """R^2 within each held-out run, their mean and its t interval over runs
    (:func:`livar_calib.intervals.t_interval`): ``r2_by_run``, ``r2_by_run_low``/``_high``,
    ``test_runs``."""
    from sklearn.metrics import r2_score

    runs = np.array([run_of(r) for r in repeats])
    values = [
        float(r2_score(y_true[runs == run], y_pred[runs == run]))
        for run in sorted(set(runs.tolist()))
        if (runs == run).sum() > 1
    ]
    mean, low, high = t_interval(np.asarray(values, dtype=np.float64).reshape(-1, 1))
    return {
        "r2_by_run": float(mean[0]),
        "r2_by_run_low": float(low[0]),
        "r2_by_run_high": float(high[0]),
        "test_runs": float(len(values)),
    }


def fit_forest(
    rows: pd.DataFrame,
    settings: ForestSettings = ForestSettings(),
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    target: str = "lam",
    holdout_repeats: Sequence[str] | None = None,
    holdout_fraction: float = 0.2,
) -> ForestResult:
    """Fit the forest of ``settings`` on the training repeats of ``rows``.

    Args:
        rows: one row per (repeat, client, layer) with ``repeat_id``, the features and target.
        features: feature columns (default ``("q_a", "q_b")``; ``WITH_SAMPLES`` adds
            ``num_samples`` as in Appendix B).
        holdout_repeats: repeat ids to hold out; ``None`` holds out ``holdout_fraction``
            of the *runs* with ``settings.seed`` (every round of a held-out run:
            :func:`~livar_calib.intervals.split_runs`); ``[]`` trains on everything (metrics
            are then NaN).
    """
    features = tuple(features)
    check_rows(rows, ("repeat_id", *features, target))
    table = rows.loc[:, ["repeat_id", *features, target]]
    numeric = table.loc[:, [*features, target]].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(numeric)):
        bad = np.argwhere(~np.isfinite(numeric))[0]
        column = [*features, target][bad[1]]
        raise CalibrationError(
            f"rows: column {column} is not finite at row {int(bad[0])} "
            f"(repeat {table['repeat_id'].iloc[bad[0]]!r})"
        )
    repeat = table["repeat_id"].astype(str).to_numpy()
    if holdout_repeats is None:
        train_ids, test_ids, _ = split_runs(
            repeat, holdout_fraction=holdout_fraction, seed=settings.seed
        )
    else:
        test_ids = sorted({str(r) for r in holdout_repeats})
        unknown = sorted(set(test_ids) - set(repeat))
        if unknown:
            raise CalibrationError(f"holdout_repeats not in rows: {unknown}")
        train_ids = sorted(set(repeat) - set(test_ids))
    if not train_ids:
        raise CalibrationError("no training repeats left after the holdout")
    is_test = np.isin(repeat, test_ids)
    x = table.loc[:, list(features)]
    y = table[target].to_numpy(dtype=np.float64)
    model = settings.regressor()
    model.fit(x.loc[~is_test], y[~is_test])
    # predictions sum the trees; with n_jobs > 1 in the order threads finish, which changes the
    # last bits between runs (and the table's checksum): predict on one thread, in tree order
    model.set_params(n_jobs=1)
    constant = float(y[~is_test].mean())
    pred = model.predict(x.loc[is_test]) if is_test.any() else np.empty(0)
    metrics = _metrics(y[is_test], pred, constant)
    metrics.update(n_train=float((~is_test).sum()), n_test=float(is_test.sum()))
    metrics.update(_r2_by_run(repeat[is_test], y[is_test], pred))
    return ForestResult(model, features, target, train_ids, test_ids, metrics)


def cross_validated_r2(
    rows: pd.DataFrame,
    settings: ForestSettings = ForestSettings(),
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    target: str = "lam",
    folds: int = 4,
) -> dict[str, float]:
    """Every run predicted by a forest fitted on the other folds of whole runs (``GroupKFold``
    over runs, at most one fold per run): the pooled R^2 over all rows (``cv_r2``) and the mean
    within-run R^2 with its t interval over all runs (``cv_r2_by_run``, ``_low``, ``_high``).
    Steadier than one split of a few held-out runs; NaN with fewer than 2 runs."""
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold

    check_rows(rows, ("repeat_id", *features, target))
    runs = np.array([run_of(r) for r in rows["repeat_id"]])
    unique = sorted(set(runs.tolist()))
    nan = float("nan")
    if len(unique) < 2:
        return {
            "cv_r2": nan,
            "cv_r2_by_run": nan,
            "cv_r2_by_run_low": nan,
            "cv_r2_by_run_high": nan,
        }
    x = rows.loc[:, list(features)].to_numpy(dtype=np.float64)
    y = rows[target].to_numpy(dtype=np.float64)
    prediction = np.empty_like(y)
    for train, test in GroupKFold(n_splits=min(folds, len(unique))).split(x, y, runs):
        model = settings.regressor().fit(x[train], y[train])
        prediction[test] = model.set_params(n_jobs=1).predict(x[test])
    by_run = _r2_by_run(rows["repeat_id"].to_numpy(), y, prediction)
    return {
        "cv_r2": float(r2_score(y, prediction)),
        "cv_r2_by_run": by_run["r2_by_run"],
        "cv_r2_by_run_low": by_run["r2_by_run_low"],
        "cv_r2_by_run_high": by_run["r2_by_run_high"],
        "cv_folds": float(min(folds, len(unique))),
        "cv_runs": by_run["test_runs"],
    }
