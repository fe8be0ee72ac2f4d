"""``python -m analysis``: regenerate every figure and table the given artifacts allow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.regenerate import Regeneration
from analysis.style import set_dpi


def parse_named_path(text: str) -> tuple[str | None, Path]:
    """``NAME=DIR`` -> ``(NAME, DIR)``; a bare ``DIR`` -> ``(None, DIR)`` (name from its
    config.json)."""
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    return None, Path(text)


def parse_table_datasets(items: list[str]) -> dict[str, list[str]]:
    """``table4=fashion-mnist`` ``table1=cifar100,digits`` -> ``{key: [datasets]}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, names = item.partition("=")
        if not sep or not names:
            raise argparse.ArgumentTypeError(f"expected TABLE=DATASET[,DATASET], got {item!r}")
        out[key] = [n for n in names.split(",") if n]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description=__doc__ + "\n\nEvery input is optional: what it is missing is skipped, "
        "with the reason, in the printed catalogue and catalogue.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="proxy calibration run folder (livar-calibrate): Figures 2, A, the calibrated table",
    )
    parser.add_argument(
        "--a-posteriori",
        dest="a_posteriori",
        nargs="+",
        action="extend",
        default=[],
        metavar="[NAME=]DIR",
        help="calibration run folder on another dataset (Figures 3, B-D: "
        "imagenet-r, cifar100, eurosat, cub200); NAME defaults to its proxy",
    )
    folders = dict(nargs="+", action="extend", type=Path, metavar="DIR")  # repeatable lists
    parser.add_argument(
        "--runs", default=[], help="livar-fed run folders (or folders of them)", **folders
    )
    parser.add_argument(
        "--sweeps",
        default=[],
        help="sweep roots (livar-sweep --root): Tables 1-4, accuracy curves and vs beta, costs",
        **folders,
    )
    parser.add_argument(
        "--reference-table",
        default="paper-table-a",
        help="table the calibrated one is compared with",
    )
    parser.add_argument(
        "--tables",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME_OR_PATH",
        help="more G_SHAP tables to draw as heat maps",
    )
    parser.add_argument("--bins", type=int, default=20, help="bins of the binned SHAP curves")
    parser.add_argument(
        "--betas",
        nargs="+",
        type=float,
        default=None,
        help="beta columns of Tables 1-3 (default: the paper's 1.0 0.5 0.2)",
    )
    parser.add_argument(
        "--table-datasets",
        nargs="+",
        action="extend",
        default=[],
        metavar="TABLE=DATASET[,DATASET]",
        help="lay out a paper table on other datasets, e.g. table4=fashion-mnist",
    )
    parser.add_argument(
        "--table4-beta",
        type=float,
        default=None,
        help="beta of Table 4 (default: the paper's 0.05)",
    )
    parser.add_argument(
        "--alpha-rounds",
        nargs="+",
        default=["all"],
        metavar="ROUND",
        help="rounds of the alpha heat maps: all (at most 6), last, or numbers",
    )
    parser.add_argument("--dpi", type=int, default=150, help="resolution of the PNG files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_dpi(args.dpi)
    rounds: list[int] | str = (
        args.alpha_rounds[0]
        if args.alpha_rounds[0] in ("all", "last")
        else [int(r) for r in args.alpha_rounds]
    )
    catalogue = Regeneration(
        args.out,
        calibration=args.calibration,
        a_posteriori=[parse_named_path(item) for item in args.a_posteriori],
        runs=args.runs,
        sweeps=args.sweeps,
        reference_table=args.reference_table,
        tables=args.tables,
        bins=args.bins,
        table_datasets=parse_table_datasets(args.table_datasets),
        betas=args.betas,
        ablation_beta=args.table4_beta,
        alpha_rounds=rounds,
    ).run()
    if catalogue.count("failed"):
        return 1
    given = [Path(p).resolve() for p in [args.calibration, *args.runs, *args.sweeps] if p]
    given += [parse_named_path(item)[1].resolve() for item in args.a_posteriori]

    def from_inputs(source: str) -> bool:
        path = Path(source).resolve()
        return any(path == g or g in path.parents for g in given)

    made = [e for e in catalogue.entries if e.status == "made"]
    if given and not any(from_inputs(src) for e in made for src in e.sources):
        print(
            "analysis: error: nothing could be made from the inputs given (see the reasons "
            "above and catalogue.json)",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
