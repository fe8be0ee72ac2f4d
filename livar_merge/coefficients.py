"""LIVAR merging coefficients alpha = G_SHAP(omega_A, omega_B) (paper Eq. 5, Appendix A).

Server side, once per round: pool omega_A over all clients and layers and compute the table's
percentiles (linear interpolation, numpy's default, as the released code); do the same for
omega_B; bin every (client, layer) with :func:`livar_merge.tables.assign_bins`; read the table;
normalise each layer over clients so that ``alpha[:, l].sum() == 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from livar_merge._validation import ArrayInput, as_float64_matrix
from livar_merge.errors import ClientUpdateError
from livar_merge.tables import GShapTable, assign_bins


@dataclass(frozen=True)
class CoefficientDetails:
    """Everything :func:`livar_coefficients` computed, for logging and analysis.

    Shapes: ``alpha``, ``raw``, ``bin_a``, ``bin_b`` are ``[clients, layers]``; ``cuts_a`` and
    ``cuts_b`` hold the omega values at the table's percentile edges.
    """

    alpha: npt.NDArray[np.float64]
    raw: npt.NDArray[np.float64]
    bin_a: npt.NDArray[np.int64]
    bin_b: npt.NDArray[np.int64]
    cuts_a: npt.NDArray[np.float64]
    cuts_b: npt.NDArray[np.float64]


def pooled_cut_points(
    omega: npt.NDArray[np.float64], percentiles: Sequence[float]
) -> npt.NDArray[np.float64]:
    """Values of the given percentiles (0-100) over all entries of ``omega`` (linear interp.)."""
    if len(percentiles) == 0:
        return np.empty(0)
    return np.percentile(omega.reshape(-1), list(percentiles), method="linear")


def gshap_raw(
    omega_a: npt.NDArray[np.float64], omega_b: npt.NDArray[np.float64], table: GShapTable
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]:
    """Un-normalised G_SHAP values ``[clients, layers]`` and the bins and cut points used."""
    cuts_a = pooled_cut_points(omega_a, table.edges_a)
    cuts_b = pooled_cut_points(omega_b, table.edges_b)
    bin_a = assign_bins(omega_a, cuts_a)
    bin_b = assign_bins(omega_b, cuts_b)
    return table.values[bin_b, bin_a], bin_a, bin_b, cuts_a, cuts_b


def normalise_per_layer(raw: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Divide each column (layer) of ``raw [clients, layers]`` by its sum over clients."""
    return raw / raw.sum(axis=0, keepdims=True)


def livar_coefficient_details(
    omega_a: ArrayInput,
    omega_b: ArrayInput,
    table: GShapTable | str,
    *,
    client_ids: Sequence[object] | None = None,
    layer_names: Sequence[str] | None = None,
) -> CoefficientDetails:
    """Like :func:`livar_coefficients`, returning the bins and cut points as well."""
    if isinstance(table, str):
        table = GShapTable.load(table)
    a = as_float64_matrix(omega_a, "omega_A", client_ids=client_ids, layer_names=layer_names)
    b = as_float64_matrix(omega_b, "omega_B", client_ids=client_ids, layer_names=layer_names)
    if a.shape != b.shape:
        raise ClientUpdateError(
            f"omega_A has shape {a.shape} but omega_B has {b.shape}; both are [clients, layers]"
        )
    if layer_names is not None and len(layer_names) != a.shape[1]:
        raise ClientUpdateError(f"{len(layer_names)} layer names for {a.shape[1]} omega columns")
    raw, bin_a, bin_b, cuts_a, cuts_b = gshap_raw(a, b, table)
    return CoefficientDetails(normalise_per_layer(raw), raw, bin_a, bin_b, cuts_a, cuts_b)


def livar_coefficients(
    omega_a: ArrayInput,
    omega_b: ArrayInput,
    table: GShapTable | str,
    *,
    client_ids: Sequence[object] | None = None,
    layer_names: Sequence[str] | None = None,
) -> npt.NDArray[np.float64]:
    """LIVAR coefficients alpha (Eq. 5), float64 ``[clients, layers]``, each column summing to 1.

    Args:
        omega_a, omega_b: layer importances ``[clients, layers]`` (numpy, torch or nested lists),
            finite and non-negative.
        table: a :class:`GShapTable` or a table name/path.
        client_ids, layer_names: used only to name the culprit in error messages.

    Boundary rule: a value exactly on a cut point goes to the middle bin
    (see :func:`livar_merge.tables.assign_bins`), so when all omegas tie every (client, layer)
    gets the middle cell and alpha is uniform. With one client alpha is 1.
    """
    return livar_coefficient_details(
        omega_a, omega_b, table, client_ids=client_ids, layer_names=layer_names
    ).alpha
