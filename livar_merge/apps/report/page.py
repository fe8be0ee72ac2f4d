"""A self-contained HTML page: inline CSS and script, figures as base64 PNG, tables from pandas.

Nothing is fetched when the page opens (no server, no CDN): it opens offline in any browser.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1b1b}
header{background:#17324d;color:#fff;padding:14px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85}main{padding:8px 28px 40px;max-width:1200px}
nav a{margin-right:14px;color:#17324d}section{margin-top:26px}h2{border-bottom:1px solid #ccd;
padding-bottom:4px}table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ccd;padding:3px 7px;text-align:right}th{background:#eef2f7}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:13px}.warn{color:#a40000;font-weight:600}
.chain{display:flex;flex-wrap:wrap;gap:8px;align-items:center;margin:10px 0}
.step{border:1px solid #9ab;border-radius:6px;padding:6px 10px;background:#f6f9fc}
.step b{display:block;font-size:11px;color:#456}.arrow{font-size:20px;color:#789}
select{margin-right:10px}
"""


def esc(text: Any) -> str:
    return html.escape(str(text))


def figure_png(fig: Any) -> str:
    """An ``<img>`` of a matplotlib figure (closed after)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="figure" class="figure" src="data:image/png;base64,{data}">'


def png_file(data: bytes, alt: str) -> str:
    """An ``<img>`` of PNG bytes."""
    encoded = base64.b64encode(data).decode()
    return f'<img alt="{esc(alt)}" class="figure" src="data:image/png;base64,{encoded}">'


def frame_html(frame: Any, *, index: bool = False, digits: int = 4) -> str:
    """A pandas DataFrame as an HTML table (numbers to ``digits`` significant digits)."""
    return str(
        frame.to_html(index=index, float_format=lambda x: f"{x:.{digits}g}", border=0, na_rep="–")
    )


@dataclass
class Page:
    """Sections of a report page, then :meth:`render`."""

    title: str
    subtitle: str
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (id, heading, body)
    data: dict[str, Any] = field(default_factory=dict)  # JSON for the page's script
    script: str = ""

    def add(self, anchor: str, heading: str, body: str) -> None:
        self.sections.append((anchor, heading, body))

    def render(self) -> str:
        nav = " ".join(f'<a href="#{a}">{esc(h)}</a>' for a, h, _ in self.sections)
        body = "\n".join(
            f'<section id="{a}"><h2>{esc(h)}</h2>\n{b}\n</section>' for a, h, b in self.sections
        )
        data = json.dumps(self.data, allow_nan=False).replace("</", "<\\/")
        script = (
            f'<script id="report-data" type="application/json">{data}</script>\n'
            f"<script>\n{self.script}\n</script>"
            if self.script
            else ""
        )
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(self.title)}</h1><p>{esc(self.subtitle)}</p></header>"
            f"<main><nav>{nav}</nav>\n{body}\n</main>{script}</body></html>\n"
        )
