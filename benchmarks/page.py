"""The leaderboard's HTML page: one self-contained file (no network) beside the plots in the results folder."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from fire_bench.report import cell_text as _cell

__all__ = ["leaderboard_page"]


_SORTER = """
document.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
  const asc = th.dataset.order !== 'asc'; th.dataset.order = asc ? 'asc' : 'desc';
  const key = r => { const t = r.cells[col].textContent; const n = parseFloat(t); return isNaN(n) ? t : n; };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1));
  rows.forEach(r => body.appendChild(r));
}));
"""


def leaderboard_page(board: Sequence[dict[str, Any]], columns: Sequence[str], title: str, notes: Sequence[str]) -> str:
    head = "".join(f"<th title='click to sort'>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c), c))}</td>" for c in columns) + "</tr>" for row in board
    )
    paragraphs = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; cursor: pointer; position: sticky; top: 0; }}
td:nth-child(-n+4), th:nth-child(-n+4) {{ text-align: left; }}
tr:nth-child(even) {{ background: #fafafa; }}
img {{ max-width: 48%; margin: 1em 1% 0 0; }}
</style></head><body>
<h1>{html.escape(title)}</h1>{paragraphs}
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p>Percentages; *_std: standard deviation over seeds; click a column to sort.</p>
<img src="asr_vs_latency.png" alt="ASR against latency overhead">
<img src="per_attack.png" alt="per-attack bars">
<img src="k_curve.png" alt="poisoned accuracy against k">
<script>{_SORTER}</script>
</body></html>
"""
