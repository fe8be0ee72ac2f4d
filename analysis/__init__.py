"""Regenerate the paper's figures and tables from saved artifacts (no training).

``python -m analysis --calibration DIR --a-posteriori imagenet-r=DIR --runs DIR --sweeps DIR
--out DIR`` draws Figure 2 and A (proxy calibration SHAP), Figures 3 and B-D (a posteriori SHAP
on other datasets with the proxy's table fixed), heat maps of G_SHAP tables, per-round accuracy
curves, per-layer alpha heat maps, and Tables 1-4, and writes ``catalogue.json`` with what was
made and what was skipped and why.

Modules: :mod:`analysis.style` (one look), :mod:`analysis.artifacts` (reading run folders),
:mod:`analysis.shap_figures`, :mod:`analysis.table_figures`, :mod:`analysis.federated_figures`,
:mod:`analysis.tables`, :mod:`analysis.catalogue`, :mod:`analysis.regenerate`.
"""

from __future__ import annotations

from analysis.regenerate import Regeneration, regenerate

__all__ = ["Regeneration", "regenerate"]
