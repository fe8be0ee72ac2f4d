"""``livar-report PATH [--out FILE]``: a self-contained HTML report (opens offline, no server).

PATH is a run folder (``livar-fed``), a sweep root (``livar-sweep --root``) or a calibration
folder (``livar-calibrate --out``); the report goes to ``PATH/report.html`` unless ``--out``.

    livar-report runs/tiny
    livar-report runs/pretrained-grid --out grid.html
    livar-report runs/calibration/x
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from livar_calib.folder import is_finished_calibration
from livar_merge._io import write_text
from livar_merge.errors import LivarError, RunFolderError
from livar_merge.federated.run_layout import RunLayout, RunReader


def report_kind(path: Path) -> str:
    """``run``, ``sweep`` or ``calibration``, from what the folder holds."""
    if not path.is_dir():
        raise RunFolderError(f"{path} is not a folder")
    if is_finished_calibration(path):
        return "calibration"
    if RunLayout(path).holds_run():
        return "run"
    from livar_merge.apps.grid_results import finished_runs

    if finished_runs(path):
        return "sweep"
    raise RunFolderError(
        f"{path} is neither a run folder (config.json and metrics.csv), a sweep root (finished "
        "run folders inside) nor a finished calibration (stages.json and summary.json)"
    )


def build_report(path: Path) -> str:
    """The HTML of PATH's report."""
    kind = report_kind(path)
    if kind == "calibration":
        from livar_merge.apps.report.calibration import calibration_report

        return calibration_report(path).render()
    if kind == "run":
        from livar_merge.apps.report.run import run_report

        return run_report(RunReader(path)).render()
    from livar_merge.apps.report.sweep import sweep_report

    return sweep_report(path).render()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="livar-report",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[4:]),
    )
    parser.add_argument("path", type=Path, help="a run folder, a sweep root or a calibration")
    parser.add_argument("--out", type=Path, help="the HTML file (default PATH/report.html)")
    args = parser.parse_args(argv)
    try:
        html = build_report(args.path)
    except (LivarError, OSError, KeyError, ValueError) as err:
        print(f"livar-report: {args.path}: {err}", file=sys.stderr)
        return 2
    out = args.out or args.path / "report.html"
    write_text(out, html)
    print(f"wrote {out} ({len(html) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
