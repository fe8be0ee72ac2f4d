"""Headless Chromium for the report tests: the DOM after the page's scripts ran, every console
message, and a full-page screenshot; and a check that an image is drawn (not blank)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

CONSOLE = re.compile(r"INFO:CONSOLE[^\]]*\] (.*)")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    browser = chromium()
    assert browser is not None
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=5000", *flags, page.resolve().as_uri()]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def render(page: Path, work: Path, height: int = 5000) -> tuple[str, list[str], Path]:
    """``(dom, console messages, screenshot)`` of ``page`` in headless Chromium."""
    work.mkdir(parents=True, exist_ok=True)
    dumped = _run(page, work / "profile-dom", "--dump-dom")
    shot = work / f"{page.stem}.png"
    shown = _run(
        page, work / "profile-shot", f"--screenshot={shot}", f"--window-size=1280,{height}"
    )
    console = [m for p in (dumped, shown) for m in CONSOLE.findall(p.stderr)]
    return dumped.stdout, console, shot


def drawn(png: bytes | Path, *, min_ink: float = 0.02, min_colours: int = 8) -> bool:
    """Whether a PNG shows something: at least ``min_ink`` of its pixels away from the
    background (its most common colour) and ``min_colours`` distinct colours."""
    from PIL import Image

    data = png.read_bytes() if isinstance(png, Path) else png
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    ink = float((np.abs(pixels.astype(int) - background).sum(axis=1) > 30).mean())
    return ink >= min_ink and len(colours) >= min_colours


def embedded_images(html: str) -> list[bytes]:
    """The PNG images embedded in a page (``data:image/png;base64,...``)."""
    return [
        base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    ]
