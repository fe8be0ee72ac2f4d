"""``livar-report`` on a run and a sweep (the calibration's report is tested beside its
calibration in ``test_calibrate.py``), rendered by headless Chromium: no console message, the
coefficient chain computed by the page's script equals ``alpha.csv``, every figure drawn."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from livar_merge.apps.fed_cli import main as fed
from livar_merge.apps.report.cli import main as report
from tests.integration.browser import chromium, drawn, embedded_images, render

needs_browser = pytest.mark.skipif(chromium() is None, reason="chromium is not installed")


def test_the_drawn_check_tells_a_blank_image_from_a_figure():
    import io

    from PIL import Image, ImageDraw

    blank = io.BytesIO()
    Image.new("RGB", (200, 100), "white").save(blank, format="PNG")
    assert not drawn(blank.getvalue())
    figure = Image.new("RGB", (200, 100), "white")
    pen = ImageDraw.Draw(figure)
    for i, colour in enumerate(
        ["red", "blue", "green", "black", "orange", "purple", "cyan", "grey"]
    ):
        pen.rectangle([10 + 22 * i, 20, 28 + 22 * i, 90], fill=colour)
    drawn_png = io.BytesIO()
    figure.save(drawn_png, format="PNG")
    assert drawn(drawn_png.getvalue())


@pytest.mark.slow
@needs_browser
def test_a_run_report_renders_and_its_chain_reproduces_alpha(tmp_path, capsys):
    out = tmp_path / "run"
    assert fed(["--preset", "tiny", "--paired", "fedavg", "--out", str(out)]) == 0
    assert report([str(out)]) == 0
    page = out / "report.html"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # nothing to fetch: opens offline
    dom, console, shot = render(page, tmp_path / "browser")
    assert console == [], console
    assert drawn(shot)
    images = embedded_images(html)
    assert len(images) >= 4 and all(drawn(image) for image in images)
    headings = ["Accuracy and loss", "Alpha per client and layer", "Why a client got its weight"]
    headings += ["Head weights", "Partition", "Clients: training, bytes, replies"]
    for heading in headings:
        assert f">{heading}</h2>" in dom, heading
    # the script's chain shows the last round's first client and layer: its alpha is alpha.csv's
    alpha = pd.read_csv(out / "alpha.csv")
    first = alpha[alpha["round"] == alpha["round"].max()].iloc[0]
    shown = re.search(r'<span id="chain-alpha">([^<]+)</span>', dom)
    assert shown is not None, "the chain was not drawn by the page's script"
    assert float(shown.group(1)) == pytest.approx(first["weight"], rel=1e-3)
    assert f"bin_a = {int(first['bin_a'])}" in dom and f"bin_b = {int(first['bin_b'])}" in dom
    assert "same bins, max |alpha difference|" in html  # recomputed from the omegas, matching
    paired = pd.read_csv(out / "paired.csv")
    assert "Paired differences" in html and len(paired) == 2


@pytest.mark.slow
@needs_browser
def test_a_sweep_report_renders_its_tables_and_figure(tmp_path):
    from livar_merge.apps.sweep import main as sweep

    root = tmp_path / "grid"
    args = ["--root", str(root), "--preset", "tiny", "--methods", "fedavg", "livar"]
    args += ["--betas", "0.5", "--seeds", "0", "1", "--paired", "fedavg"]
    args += ["--set", "rounds=1", "num_clients=2", "max_train=120", "max_test=40"]
    assert sweep(args) == 0
    assert report([str(root), "--out", str(tmp_path / "sweep.html")]) == 0
    dom, console, shot = render(tmp_path / "sweep.html", tmp_path / "browser")
    assert console == [] and drawn(shot)
    assert all(drawn(image) for image in embedded_images(dom))
    for heading in ("Top-1 against beta", "Mean (std) over seeds", "Paired differences", "Runs"):
        assert f">{heading}</h2>" in dom, heading
    summaries = [json.loads(p.read_text()) for p in root.glob("*/summary.json")]
    for summary in summaries:  # every run's final top-1 is in the runs table
        assert f"{summary['final_accuracy']:.4g}" in dom


def test_a_folder_that_is_none_of_the_three_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report([str(tmp_path / "empty")]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report.html").exists()
