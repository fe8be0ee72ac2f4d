"""``livar-calibrate``: calibrate a G_SHAP table on a proxy dataset (Section 4.1, Appendix A).

Stages: proxy training (M clients and a joint model from the same start), per-layer NNLS (Eq. 4),
a random forest from the omega quantiles to lambda, SHAP, discretisation into a versioned table,
and a quality report. With no options it calibrates on the embedded default proxy
(:class:`~livar_calib.config.CalibConfig`: Fashion-MNIST at 42 px on the pretrained DINOv2
ViT-S/14, ``dinov2-s14-imgfocus``) in minutes on 2 CPU cores; ``--preset random-init`` is the
earlier scikit-learn digits / random-init ViT control.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from livar_calib.config import CALIB_PRESETS, CalibConfig, validate_calib_config
from livar_merge._options import (
    add_dataclass_options,
    cli_parser,
    coerce_option,
    collect_overrides,
    report_error,
)
from livar_merge.engines.ray_engine import EngineOptions, engine_options, import_ray
from livar_merge.errors import LivarError

EXAMPLES = """examples:
  livar-calibrate                                         # embedded default, ~5 min on 2 cores
  livar-calibrate --proxy tiny-imagenet --data-root DIR   # the paper's proxy, small model
  livar-calibrate --preset paper --data-root DIR          # paper set-up: ViT-B/16 in21k (GPU)
  livar-calibrate --out runs/calib --resume               # continue an interrupted run
  livar-calibrate --engine ray                            # (beta, seed) runs as local Ray tasks
  livar-calibrate --preset paper --engine ray --ray-address auto --ray-gpus-per-task 1
  livar-fed --preset cpu --table runs/calibration/<name>/table/<name>.v1.json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser("livar-calibrate", __doc__, EXAMPLES)
    parser.add_argument(
        "--preset",
        choices=sorted(CALIB_PRESETS),
        default="default",
        help="default (embedded proxy: Fashion-MNIST, pretrained DINOv2 ViT-S/14), standard "
        "(the earlier default: 4x its training), paper (Tiny-ImageNet, ViT-B/16), random-init "
        "(the earlier digits / random-init control), tiny",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="run folder (default runs/calibration/<table name>)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last completed client/round",
    )
    parser.add_argument(
        "--publish",
        type=Path,
        nargs="?",
        const=Path("artifacts/gshap"),
        default=None,
        help="also copy the table, under the next free version, "
        "into this folder (default when given bare: artifacts/gshap)",
    )
    add_dataclass_options(parser.add_argument_group("calibration options"), CalibConfig)
    add_dataclass_options(
        parser.add_argument_group(
            "engine options (how the (beta, seed) proxy runs are executed; same results)"
        ),
        EngineOptions,
    )
    return parser


def resolve(args: argparse.Namespace) -> CalibConfig:
    """Preset < command line, every value coerced and checked, then the cross-option checks."""
    options = {**CALIB_PRESETS[args.preset], **collect_overrides(args, CalibConfig)}
    config = CalibConfig(**{k: coerce_option(CalibConfig, k, v) for k, v in options.items()})
    validate_calib_config(config)
    return config


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 2 for a refused run: bad options before anything is loaded (usage
    error), then missing data or weights before anything is written (``LivarError``/
    ``OSError``; any other exception is a bug and keeps its traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve(args)
        engine = engine_options(args)
    except LivarError as err:
        parser.error(str(err))
    name = config.table_name or config.default_table_name()
    out = args.out or Path("runs") / "calibration" / name
    if (out / "config.json").exists() and not args.resume:
        message = f"{out} already holds a calibration; pass --resume to continue it or choose --out"
        return report_error("livar-calibrate", message)

    from livar_calib.pipeline import preflight, run_calibration

    try:  # data, weights and the engine found before anything is written to --out
        preflight(config)
        if engine.engine == "ray":
            import_ray()
    except (LivarError, OSError) as err:
        return report_error("livar-calibrate", err, f" (nothing was written to {out})")
    try:
        summary = run_calibration(config, out, publish_dir=args.publish, engine=engine)
    except (LivarError, OSError) as err:
        return report_error("livar-calibrate", err)
    print(
        f"table: {summary['table']}"
        + (f" (published as {summary['published']})" if summary["published"] else "")
    )
    print(f"run folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
