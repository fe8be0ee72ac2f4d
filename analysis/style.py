"""One look for every figure: rc parameters, colours, display names, figure creation and saving.

Figures are built with matplotlib's object-oriented API on the Agg canvas (no pyplot state, no
display). Every plotting function of :mod:`analysis` returns a :class:`FigureOutput`: the files
it wrote and the data it drew, so the content can be checked without looking at pixels.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from livar_merge.errors import ConfigError

DPI = 150
PANEL_WIDTH = 4.2
PANEL_HEIGHT = 3.4

RC_PARAMS: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "figure.titlesize": 11,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.8,
    "image.cmap": "viridis",
    "pdf.fonttype": 42,
    "savefig.dpi": DPI,
}

SCATTER_COLOUR = "tab:blue"
CURVE_COLOUR = "tab:red"
PROXY_COLOUR = "0.25"
EDGE_COLOUR = "0.45"
SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"

METHOD_ORDER = (
    "fedavg",
    "regmean",
    "fisher",
    "fedproto",
    "ccvr",
    "livar-alpha",
    "livar-sigma",
    "livar",
    "livar+ccvr",
)
METHOD_NAMES = {
    "fedavg": "FedAvg",
    "regmean": "RegMean",
    "fisher": "FisherAvg",
    "fedproto": "FedProto",
    "ccvr": "CCVR",
    "livar": "LIVAR",
    "livar-alpha": "LIVAR (α only)",
    "livar-sigma": "LIVAR (σ only)",
    "livar+ccvr": "LIVAR +CCVR",
}
METHOD_COLOURS = {
    "fedavg": "tab:gray",
    "regmean": "tab:olive",
    "fisher": "tab:cyan",
    "fedproto": "tab:pink",
    "ccvr": "tab:purple",
    "livar-alpha": "tab:orange",
    "livar-sigma": "tab:green",
    "livar": "tab:red",
    "livar+ccvr": "tab:brown",
}
DATASET_NAMES = {
    "cifar100": "CIFAR-100",
    "imagenet-r": "ImageNet-R",
    "eurosat": "EuroSAT",
    "cub200": "CUB-200",
    "tiny-imagenet": "Tiny-ImageNet",
    "fashion-mnist": "Fashion-MNIST",
    "digits": "digits",
    "synthetic": "synthetic",
}
OMEGA_A = "$\\omega^{l_A}_m$"
OMEGA_B = "$\\omega^{l_B}_m$"
LAMBDA = "$\\lambda^l_m$"


def set_dpi(dpi: int) -> None:
    """Resolution of the PNG files written from now on (PDFs are vector graphics)."""
    global DPI
    if dpi < 10:
        raise ConfigError(f"dpi must be >= 10, got {dpi}")
    DPI = int(dpi)


def method_name(method: str) -> str:
    """Display name of an aggregation method (``livar`` -> ``LIVAR``)."""
    return METHOD_NAMES.get(method, method)


def method_colour(method: str, index: int = 0) -> str:
    """Fixed colour of a known method; otherwise the ``index``-th colour of the cycle."""
    return METHOD_COLOURS.get(method, f"C{index % 10}")


def dataset_name(dataset: str) -> str:
    """Display name of a dataset of the runtime's registry (``cub200`` -> ``CUB-200``)."""
    return DATASET_NAMES.get(dataset, dataset)


def sort_methods(methods: Any) -> list[str]:
    """Methods in the paper's order, unknown ones after them alphabetically."""
    known = [m for m in METHOD_ORDER if m in set(methods)]
    return known + sorted(set(methods) - set(known))


def format_beta(beta: float) -> str:
    """The paper prints Dirichlet betas as ``1.0``, ``0.5``, ``0.05``."""
    return f"{beta:.1f}" if float(beta).is_integer() else f"{beta:g}"


@contextlib.contextmanager
def styled() -> Iterator[None]:
    """Apply :data:`RC_PARAMS` while creating and saving a figure."""
    with matplotlib.rc_context(RC_PARAMS):
        yield


def new_figure(
    ncols: int = 1,
    nrows: int = 1,
    *,
    width: float = PANEL_WIDTH,
    height: float = PANEL_HEIGHT,
    sharey: bool = False,
) -> tuple[Figure, list[Axes]]:
    """An Agg-backed figure with ``nrows x ncols`` panels of ``width x height`` inches.

    Returns the figure and its axes flattened row by row. Call inside :func:`styled`.
    """
    figure = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, sharey=sharey, squeeze=False)
    return figure, list(axes.reshape(-1))


def save_figure(figure: Figure, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``path`` with suffixes ``.png`` and ``.pdf`` (parents created); returns both."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    png = base.with_name(base.name + ".png")
    pdf = base.with_name(base.name + ".pdf")
    figure.savefig(png, dpi=DPI)
    figure.savefig(pdf)
    return png, pdf


@dataclass(frozen=True)
class FigureOutput:
    """What a plotting function wrote and drew.

    Attributes:
        png, pdf: the written files.
        title: the figure's title.
        data: the plotted data; keys are documented by each plotting function.
    """

    png: Path
    pdf: Path
    title: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return [self.png, self.pdf]


def finish(
    figure: Figure, path: str | os.PathLike[str], title: str, data: dict[str, Any]
) -> FigureOutput:
    """Set the suptitle, save PNG and PDF, and bundle the plotted data."""
    figure.suptitle(title)
    png, pdf = save_figure(figure, path)
    return FigureOutput(png=png, pdf=pdf, title=title, data=data)
