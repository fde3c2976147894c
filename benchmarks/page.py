"""The leaderboard's HTML page: one self-contained file that works offline (no network, no CDN).

The board's rows are embedded as JSON and rendered by plain inline JavaScript: a ranking of the defenses
(means over the shown rows), the best defense per attack, a defense x attack pivot, the detectors' table and
the full per-row table (collapsed, with a glossary of every column). Filters by dataset, backbone, attack and
seed count update every table; every column sorts on a click. The plots are embedded as PNG data URIs beside
the tables they illustrate (they show the whole grid, whatever the filters).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fire_bench.report import CI_SUFFIXES, PERCENT

__all__ = ["BASELINE", "glossary", "leaderboard_page", "page_data"]

BASELINE = "none"
"""The undefended model's label: DER's reference, never a candidate for the best defense."""
FILTERS = (("dataset", "dataset"), ("backbone", "backbone"), ("attack_name", "attack"), ("seeds", "seeds"))

_EXACT = {
    "dataset": "the clean dataset the record was trained on",
    "backbone": "the network architecture (BackdoorBench's model name)",
    "attack_name": "the backdoor attack of the record",
    "defense_name": "the runtime defense (its label in the grid; 'none' is the undefended model)",
    "ratio": "the attack's poisoning ratio (share of training samples poisoned)",
    "test_acc": "clean accuracy (%): clean evaluation inputs classified correctly",
    "test_asr": "attack success rate (%): poisoned evaluation inputs classified as the attacker's target",
    "test_ra": "poisoned accuracy, BackdoorBench's robust accuracy (%): poisoned inputs given their true label",
    "der": (
        "defense effectiveness rating (%), BackdoorBench's: (max(0, ASR drop) - max(0, clean accuracy drop) + 1) / 2 "
        "against the undefended model on the same record and seed; 50 = no change, 100 = ASR removed at no cost"
    ),
    "tpr": "detectors: share of poisoned inputs rejected (%)",
    "fpr": "detectors: share of clean inputs rejected (%), calibrated on the defender's clean data",
    "auroc": "area under the ROC curve of the defense's poison score, poisoned against clean inputs (%)",
    "forward_passes": "forward passes of the network per input at inference (1 = no overhead in passes)",
    "peak_mem_mb": (
        "peak memory growth (MiB) of the defense's first call on the largest batch (CUDA's allocator on a GPU, the "
        "process's resident set on the CPU), from the latency phase"
    ),
    "fit_s": "seconds to fit the defense on the defender's data, from the latency phase",
    "seeds": "cells averaged into the row: record seeds x protocol seeds",
    "records": "records (of the same attack, one per record seed) among the row's cells",
    "rank": "position in the current sort",
    "rows": "rows (attacks x datasets x backbones) averaged into the ranking line",
}
_PATTERNS = (
    (
        r"latency_b(\d+)_ms",
        "time per input at batch size {0} (ms), median over the timing rounds; the latency phase times each defense "
        "once per dataset and backbone, so latency columns are the same for every attack",
    ),
    (
        r"latency_b(\d+)_ratio",
        "latency at batch size {0} relative to the undefended model: the median of the per-round ratios, the two "
        "timed alternately in the same rounds (1.00 = no overhead; the latency check says whether to trust it)",
    ),
    (r"latency_b(\d+)_rounds", "interleaved timing rounds behind latency_b{0}_ms"),
    (r"(\w+)_std", "standard deviation of {0} over the row's cells (record seeds x protocol seeds)"),
    (r"(\w+)_ci_(low|high)", "{1} end of the confidence interval of {0} (shown in that column, not on its own)"),
)
_INTERVALS = (
    "Intervals: where a row carries a 95% interval (<metric>_ci_low, <metric>_ci_high) its value is shown as "
    "mean ± h, h the larger side of the interval (so the range shown covers it), as in leaderboard.md; a ranking "
    "line, a mean over rows, combines their h as sqrt(sum of h squared) / n (independent rows, as summary.txt) and "
    "shows one only when every averaged row has an interval. Where no interval is given the mean stands alone."
)


def glossary(columns: Sequence[str]) -> dict[str, str | None]:
    """What each of ``columns`` means, ``None`` for a column this page cannot describe."""
    out: dict[str, str | None] = {}
    for column in columns:
        text = _EXACT.get(column)
        for pattern, template in _PATTERNS:
            match = re.fullmatch(pattern, column)
            if text is None and match:
                text = template.format(*match.groups())
        out[column] = text
    return out


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _protocol(board: Sequence[dict[str, Any]]) -> str:
    splits = list(dict.fromkeys(re.sub(r"\s*\(seed \d+\)$", "", str(r["split"])) for r in board if r.get("split")))
    described = f" ({'; '.join(splits)})" if splits else ""
    return (
        "Protocol: every defense is fitted on the defender's data only and scored on held-out evaluation inputs it "
        f"never saw{described}; each row is one attack and defense on one dataset and backbone, averaged over its "
        "record seeds and protocol seeds."
    )


def page_data(board: Sequence[dict[str, Any]], columns: Sequence[str]) -> dict[str, Any]:
    """What the page embeds: the rows (fractions, ``None`` for missing), the full table's columns (intervals
    folded into their metric), the glossary, the protocol sentence and the percent columns."""
    shown = [c for c in columns if not c.endswith(CI_SUFFIXES)]
    rows = [{k: _finite(v) for k, v in row.items() if k != "split"} for row in board]
    percent = [c for c in dict.fromkeys(k for row in rows for k in row) if c.removesuffix("_std") in PERCENT]
    return {
        "rows": rows,
        "columns": shown,
        "glossary": glossary(shown),
        "protocol": _protocol(board),
        "percent": percent,
        "baseline": BASELINE,
        "filters": [list(f) for f in FILTERS],
    }


_CSS = """
body { font: 14px/1.35 system-ui, sans-serif; margin: 10px 18px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 14px 0 4px; }
.top p.note { max-width: 560px; }
p { margin: 3px 0; } .small { font-size: 12px; color: #555; } .headline { font-size: 15px; margin: 6px 0; }
#filters { display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 6px 0; padding: 5px 8px; background: #f4f6f8;
  border-radius: 4px; } #filters label { margin-right: 6px; white-space: nowrap; } #filters b { margin-right: 4px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d4d4d4; padding: 2px 6px; text-align: right; white-space: nowrap; }
th { background: #eef0f2; cursor: pointer; user-select: none; }
th.asc::after { content: " \\25B2"; font-size: 9px; } th.desc::after { content: " \\25BC"; font-size: 9px; }
td.text, th.text { text-align: left; } tbody tr:nth-child(even) { background: #fafafa; }
tr.best td { font-weight: 600; }
.top { display: grid; grid-template-columns: fit-content(760px) minmax(0, 1fr); gap: 24px; align-items: start; }
img.plot { max-width: 100%; display: block; margin-top: 6px; }
.side img.plot { width: 100%; max-width: 720px; } .wide img.plot { width: 820px; margin-top: 0; }
.pair { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
.pa { margin-left: 2px; } .cell span { padding: 0 3px; border-radius: 2px; }
details { margin-top: 14px; } .scroll { overflow-x: auto; } summary { cursor: pointer; font-weight: 600; }
#glossary td { white-space: normal; text-align: left; max-width: 900px; }
"""

_SCRIPT = r"""
const D = JSON.parse(document.getElementById('page-data').textContent);
const PCT = new Set(D.percent);
const state = {filters: {}, sort: {ranking: ['der', 'desc']}, pivot: 'asr_pa'};
const ENTITIES = {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'};
const esc = s => String(s).replace(/[&<>"']/g, c => ENTITIES[c]);
const num = v => typeof v === 'number' && isFinite(v);
const mean = xs => { const v = xs.filter(num); return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null; };
const unique = xs => [...new Set(xs)];

// a value with its interval: {v, h} (fractions; h the larger side of the interval, or null)
function withInterval(row, key) {
  const v = row[key], low = row[key + '_ci_low'], high = row[key + '_ci_high'];
  if (!num(v)) return {v: null, h: null};
  if (!num(low) || !num(high)) return {v, h: null};
  return {v, h: Math.max(0, v - low, high - v)};
}
function combine(rows, key) {  // mean over rows; h = sqrt(sum h^2) / n, only when every row has an interval
  const parts = rows.map(r => withInterval(r, key)).filter(p => p.v !== null);
  if (!parts.length) return {v: null, h: null};
  const n = parts.length, v = parts.reduce((a, p) => a + p.v, 0) / n;
  if (parts.length < rows.length || parts.some(p => p.h === null)) return {v, h: null};
  return {v, h: Math.sqrt(parts.reduce((a, p) => a + p.h ** 2, 0)) / n};
}
function pct(p, digits) {
  if (p === null || p.v === null) return '';
  const m = (100 * p.v).toFixed(digits);
  return p.h === null ? m : m + ' ± ' + (100 * p.h).toFixed(digits);
}
const short = v => !num(v) ? '' : Math.abs(v) >= 100 ? v.toFixed(0) : String(Number(v.toPrecision(3)));
const ratio = v => num(v) ? v.toFixed(2) + '\u00d7' : '';

function visible() {
  return D.rows.filter(r => D.filters.every(([key]) => state.filters[key].has(String(r[key]))));
}
function groupBy(rows, key) {
  const out = new Map();
  rows.forEach(r => { const k = key(r); if (!out.has(k)) out.set(k, []); out.get(k).push(r); });
  return out;
}

// a sortable table: cols = [{key, label, text?: true, value: row -> sort key, html: row -> cell html, title}]
function table(id, cols, rows, rowClass) {
  const el = document.getElementById(id);
  const [skey, sdir] = state.sort[id] || [null, null];
  const col = cols.find(c => c.key === skey);
  if (col) {
    const sign = sdir === 'asc' ? 1 : -1;
    rows = rows.map((r, i) => [r, i]).sort(([a, i], [b, j]) => {
      const x = col.value(a), y = col.value(b);
      const missing = (x === null || x === undefined || x === '') - (y === null || y === undefined || y === '');
      if (missing) return missing;  // missing values last, whatever the direction
      return (x > y ? 1 : x < y ? -1 : i - j) * (x === y ? 1 : sign);
    }).map(([r]) => r);
  }
  const head = cols.map(c => {
    const cls = (c.text ? 'text ' : '') + (c.key === skey ? sdir : '');
    const title = esc(c.title || 'click to sort');
    return `<th data-key="${esc(c.key)}" class="${cls}" title="${title}">${esc(c.label)}</th>`;
  }).join('');
  const body = rows.map((r, i) => `<tr class="${rowClass ? rowClass(r, i) : ''}">` +
    cols.map(c => `<td class="${c.text ? 'text' : ''}">${c.html(r, i)}</td>`).join('') + '</tr>').join('');
  el.innerHTML = `<table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
  el.querySelectorAll('th').forEach(th => th.addEventListener('click', () => {
    const key = th.dataset.key, [k, d] = state.sort[id] || [];
    const first = cols.find(c => c.key === key).text ? 'asc' : 'desc';
    state.sort[id] = [key, k === key ? (d === 'asc' ? 'desc' : 'asc') : first];
    render();
  }));
  return rows;
}

function ranking(rows) {
  const lines = [...groupBy(rows, r => r.defense_name)].map(([defense, members]) => ({
    defense, members, rows: members.length,
    acc: combine(members, 'test_acc'), asr: combine(members, 'test_asr'),
    pa: combine(members, 'test_ra'), der: combine(members, 'der'),
    passes: mean(members.map(r => r.forward_passes)), latency: mean(members.map(r => r.latency_b1_ratio)),
  }));
  const m = k => r => r[k].v, g = k => k + ': ' + (D.glossary[k] || '');
  const cols = [
    {key: 'rank', label: '#', value: () => 0, html: (r, i) => i + 1, title: D.glossary.rank},
    {key: 'defense', label: 'defense', text: true, value: r => r.defense, html: r => esc(r.defense),
     title: D.glossary.defense_name || ''},
    {key: 'acc', label: 'clean acc', value: m('acc'), html: r => pct(r.acc, 1), title: g('test_acc')},
    {key: 'asr', label: 'ASR', value: m('asr'), html: r => pct(r.asr, 1), title: g('test_asr')},
    {key: 'pa', label: 'PA', value: m('pa'), html: r => pct(r.pa, 1), title: g('test_ra')},
    {key: 'der', label: 'DER', value: m('der'), html: r => pct(r.der, 1), title: g('der')},
    {key: 'passes', label: 'passes', value: r => r.passes, html: r => short(r.passes), title: g('forward_passes')},
    {key: 'latency', label: 'latency b1', value: r => r.latency, html: r => ratio(r.latency),
     title: g('latency_b1_ratio')},
    {key: 'rows', label: 'rows', value: r => r.rows, html: r => r.rows, title: D.glossary.rows},
  ];
  const shown = table('ranking', cols, lines, (r) => r.defense === D.baseline ? 'small' : '');
  headline(lines);
  return shown;
}

function headline(lines) {
  const el = document.getElementById('headline');
  const ranked = lines.filter(l => l.defense !== D.baseline && l.der.v !== null).sort((a, b) => b.der.v - a.der.v);
  if (!ranked.length) { el.textContent = 'No defense with a DER in the shown rows.'; return; }
  const [best, next] = ranked, base = lines.find(l => l.defense === D.baseline);
  const drop = base && base.acc.v !== null && best.acc.v !== null ? 100 * (base.acc.v - best.acc.v) : null;
  const cost = drop === null ? '' : drop > 0 ? `, at a cost of ${drop.toFixed(1)} points of clean accuracy` :
    `, with ${(-drop).toFixed(1)} points more clean accuracy than the undefended model`;
  el.innerHTML = `By mean DER, <b>${esc(best.defense)}</b> leads with ${pct(best.der, 1)}% ` +
    (next ? `(${(100 * (best.der.v - next.der.v)).toFixed(1)} points ahead of ${esc(next.defense)}); ` : '; ') +
    `ASR ${pct(best.asr, 1)}%, PA ${pct(best.pa, 1)}%${cost}, ${short(best.passes)} forward passes per input and ` +
    `${ratio(best.latency) || 'unmeasured'} the undefended latency at batch 1.`;
}

const groupKey = r => [r.dataset, r.backbone, r.attack_name].join(' / ');
function groups(rows) {  // the pivot's columns: one per dataset x backbone x attack shown
  const keys = unique(rows.map(groupKey));
  const several = unique(rows.map(r => r.dataset + r.backbone)).length > 1;
  return keys.map(k => { const r = rows.find(x => groupKey(x) === k);
    return {key: k, label: several ? `${r.attack_name} (${r.dataset}, ${r.backbone})` : r.attack_name}; });
}

function best(rows) {
  const lines = groups(rows).map(g => {
    const members = rows.filter(r => groupKey(r) === g.key && r.defense_name !== D.baseline && num(r.der))
      .sort((a, b) => (b.der - a.der) || (b.test_acc - a.test_acc));
    return {attack: g.label, top: members[0], next: members[1]};
  }).filter(l => l.top);
  const v = k => l => l.top[k];
  table('best', [
    {key: 'attack', label: 'attack', text: true, value: l => l.attack, html: l => esc(l.attack)},
    {key: 'defense', label: 'best defense', text: true, value: l => l.top.defense_name,
     html: l => `<b>${esc(l.top.defense_name)}</b>`},
    {key: 'der', label: 'DER', value: v('der'), html: l => pct(withInterval(l.top, 'der'), 1)},
    {key: 'asr', label: 'ASR', value: v('test_asr'), html: l => pct(withInterval(l.top, 'test_asr'), 1)},
    {key: 'pa', label: 'PA', value: v('test_ra'), html: l => pct(withInterval(l.top, 'test_ra'), 1)},
    {key: 'acc', label: 'clean acc', value: v('test_acc'), html: l => pct(withInterval(l.top, 'test_acc'), 1)},
    {key: 'margin', label: 'runner-up, DER behind', text: true, value: l => l.next ? l.top.der - l.next.der : null,
     html: l => l.next ? `${esc(l.next.defense_name)} \u2212${(100 * (l.top.der - l.next.der)).toFixed(1)}` : ''},
  ], lines);
}

const MODES = {
  asr_pa: {label: 'ASR / PA', keys: ['test_asr', 'test_ra']},
  test_acc: {label: 'clean acc', keys: ['test_acc']},
  der: {label: 'DER', keys: ['der']},
};
function shade(key, v, range) {
  if (!num(v)) return '';
  if (key === 'test_asr') return `rgba(215, 48, 39, ${(0.75 * v).toFixed(3)})`;  // red: the attack works
  if (key === 'test_ra') return `rgba(26, 152, 80, ${(0.75 * v).toFixed(3)})`;  // green: true labels recovered
  if (key === 'der') {  // green above 50 (the attack weakened), red below
    const t = (1.5 * Math.abs(v - 0.5)).toFixed(3);
    return v >= 0.5 ? `rgba(26, 152, 80, ${t})` : `rgba(215, 48, 39, ${t})`;
  }
  const [lo, hi] = range, t = hi > lo ? (v - lo) / (hi - lo) : 1;  // clean accuracy: relative to the shown range
  return `rgba(26, 152, 80, ${(0.7 * t).toFixed(3)})`;
}
function pivot(rows) {
  const mode = MODES[state.pivot], cols = groups(rows);
  const accs = rows.map(r => r.test_acc).filter(num), range = [Math.min(...accs), Math.max(...accs)];
  const lines = [...groupBy(rows, r => r.defense_name)].map(([defense, members]) =>
    ({defense, byGroup: new Map(members.map(r => [groupKey(r), r]))}));
  const cell = (line, g) => {
    const r = line.byGroup.get(g.key);
    if (!r) return '';
    return '<span class="cell">' + mode.keys.map(k => {
      const p = withInterval(r, k), text = state.pivot === 'asr_pa' ? pct({v: p.v, h: null}, 1) : pct(p, 1);
      const style = `background:${shade(k, p.v, range)}`, title = `${esc(k)}: ${esc(pct(p, 1))}`;
      return `<span class="${k === 'test_ra' ? 'pa' : ''}" style="${style}" title="${title}">${text}</span>`;
    }).join(' / ') + '</span>';
  };
  table('pivot', [
    {key: 'defense', label: 'defense', text: true, value: l => l.defense, html: l => esc(l.defense)},
    ...cols.map(g => ({key: 'g:' + g.key, label: g.label, title: `${mode.label} on ${g.label}; click to sort`,
      value: l => { const r = l.byGroup.get(g.key); return r && num(r[mode.keys[0]]) ? r[mode.keys[0]] : null; },
      html: l => cell(l, g)})),
  ], lines);
}

function detectors(rows) {
  const isDetector = r => ['tpr', 'fpr', 'auroc'].some(k => num(r[k]));
  const cols = groups(rows.filter(isDetector));
  const lines = [...groupBy(rows.filter(isDetector), r => r.defense_name)].map(([defense, members]) => ({
    defense, tpr: mean(members.map(r => r.tpr)), fpr: mean(members.map(r => r.fpr)),
    auroc: mean(members.map(r => r.auroc)), byGroup: new Map(members.map(r => [groupKey(r), r]))}));
  const p = v => num(v) ? (100 * v).toFixed(1) : '\u2013', g = k => 'mean over the shown rows: ' + D.glossary[k];
  document.getElementById('detectors-none').hidden = lines.length > 0;
  table('detectors', [
    {key: 'defense', label: 'defense', text: true, value: l => l.defense, html: l => esc(l.defense)},
    {key: 'tpr', label: 'TPR', value: l => l.tpr, html: l => p(l.tpr), title: g('tpr')},
    {key: 'fpr', label: 'FPR', value: l => l.fpr, html: l => p(l.fpr), title: g('fpr')},
    {key: 'auroc', label: 'AUROC', value: l => l.auroc, html: l => p(l.auroc), title: g('auroc')},
    ...cols.map(g => ({key: 'g:' + g.key, label: g.label + ' TPR / FPR / AUROC',
      value: l => { const r = l.byGroup.get(g.key); return r && num(r.auroc) ? r.auroc : null; },
      html: l => { const r = l.byGroup.get(g.key); return r ? [r.tpr, r.fpr, r.auroc].map(p).join(' / ') : ''; }})),
  ], lines);
}

function full(rows) {
  const text = c => !rows.some(r => num(r[c])) && rows.some(r => r[c] !== null && r[c] !== undefined);
  const cols = D.columns.map(c => ({key: c, label: c, text: text(c), title: D.glossary[c] || '',
    value: r => r[c] === undefined ? null : r[c],
    html: r => {
      const v = r[c];
      if (v === null || v === undefined) return '';
      if (PCT.has(c)) return esc(pct(withInterval(r, c), 2));
      if (typeof v !== 'number') return esc(v);
      if (/latency|_s$|_mb$/.test(c)) return String(Number(v.toPrecision(3)));
      return Number.isInteger(v) ? String(v) : v.toFixed(2);
    }}));
  table('full', cols, rows);
  document.getElementById('full-count').textContent = `${rows.length} of ${D.rows.length} rows`;
}

function render() {
  const rows = visible();
  document.getElementById('shown').textContent = `${rows.length} of ${D.rows.length} rows shown`;
  ranking(rows); best(rows); pivot(rows); detectors(rows); full(rows);
}

function filters() {
  const el = document.getElementById('filters');
  D.filters.forEach(([key, label]) => {
    const values = unique(D.rows.map(r => String(r[key])));
    state.filters[key] = new Set(values);
    const box = document.createElement('span');
    box.innerHTML = `<b>${esc(label)}</b>` + values.map(v =>
      `<label><input type="checkbox" data-filter="${esc(key)}" value="${esc(v)}" checked> ${esc(v)}</label>`).join('');
    el.appendChild(box);
  });
  el.querySelectorAll('input').forEach(input => input.addEventListener('change', () => {
    const set = state.filters[input.dataset.filter];
    if (input.checked) set.add(input.value); else set.delete(input.value);
    render();
  }));
  document.querySelectorAll('input[name=pivot-mode]').forEach(input => input.addEventListener('change', () => {
    state.pivot = input.value; render();
  }));
}

filters();
render();
"""


def _image(plots: Mapping[str, bytes], name: str, alt: str) -> str:
    if name not in plots:
        return ""
    data = base64.b64encode(plots[name]).decode("ascii")
    return f'<img class="plot" src="data:image/png;base64,{data}" alt="{html.escape(alt)}" title="{html.escape(name)}">'


def leaderboard_page(
    board: Sequence[dict[str, Any]],
    columns: Sequence[str],
    title: str,
    notes: Sequence[str],
    plots: Mapping[str, bytes] | None = None,
) -> str:
    """The page as one HTML string.

    Args:
        board: the leaderboard's rows (:func:`fire_bench.report.leaderboard`), metrics as fractions; rows may
            carry ``<metric>_ci_low`` / ``<metric>_ci_high`` (fractions), shown as ``mean ± h``.
        columns: the full table's columns, in order.
        title: the page's title.
        notes: short lines shown under the protocol (the latency check, the wall time).
        plots: PNG bytes by file name (``asr_vs_latency.png``, ``per_attack.png``, ``k_curve.png``), embedded
            as data URIs; others are shown at the end.
    """
    plots = dict(plots or {})
    data = page_data(board, columns)
    embedded = json.dumps(data, allow_nan=False).replace("<", "\\u003c")
    meaning = data["glossary"]
    glossary_rows = "".join(
        f"<tr><td><code>{html.escape(c)}</code></td><td>{html.escape(t or '(not described)')}</td></tr>"
        for c, t in meaning.items()
    )
    known = {"asr_vs_latency.png", "per_attack.png", "k_curve.png"}
    others = "".join(_image(plots, name, name) for name in plots if name not in known)
    k_curve = _image(plots, "k_curve.png", "FIRE streaming: poisoned accuracy against k, one line per attack")
    paragraphs = "".join(f'<p class="small">{html.escape(n)}</p>' for n in notes)
    modes = "".join(
        f'<label><input type="radio" name="pivot-mode" value="{value}"{" checked" if value == "asr_pa" else ""}>'
        f" {label}</label> "
        for value, label in (("asr_pa", "ASR / PA"), ("test_acc", "clean acc"), ("der", "DER"))
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(data["protocol"])}</p>{paragraphs}
<noscript><p><b>This page draws its tables with JavaScript; the same numbers are in leaderboard.md and
leaderboard.csv beside it.</b></p></noscript>
<div id="filters"></div>
<p class="headline" id="headline"></p>
<div class="top">
<div><h2>Ranking of the defenses</h2>
<p class="small note">Percentages, means over the shown rows (attacks; each row a mean over its seeds). ASR: attack
success rate (lower is better); PA: accuracy on poisoned inputs (higher is better); DER: BackdoorBench's rating
against the undefended model (50 = no change); latency b1: time per input at batch 1 relative to the undefended
model. Sorted by DER; click any column to sort. <span id="shown"></span>.</p>
<div id="ranking"></div></div>
<div class="side"><h2>Best defense per attack</h2>
<p class="small note">Rule: the highest DER on that attack (ties: the higher clean accuracy); the undefended model is
not a candidate.</p>
<div id="best"></div>
{_image(plots, "asr_vs_latency.png", "ASR against latency at batch 1, one marker per defense")}
</div></div>
<h2>Per attack</h2>
<p>Show: {modes}</p>
<p class="small">ASR in red (the attack works), PA in green, DER green above 50 and red below,
clean accuracy greener within the shown range; hover a cell for its interval. Click a column to sort by it.</p>
<div class="pair"><div id="pivot"></div>
<div class="wide">{_image(plots, "per_attack.png", "ASR and poisoned accuracy per attack and defense")}</div></div>
<h2>Detectors</h2>
<p class="small">Defenses that reject inputs (TPR, FPR) or score them (AUROC), in percent: TPR the share of
poisoned inputs rejected, FPR the share of clean inputs rejected (the threshold calibrated on the defender's
clean data). <span id="detectors-none" hidden>No detector in the shown rows.</span></p>
<div id="detectors"></div>
{f"<h2>FIRE streaming: poisoned accuracy against k</h2>{k_curve}" if k_curve else ""}
{others}
<details><summary>Every row and column (<span id="full-count"></span>)</summary>
<div id="full" class="scroll"></div>
<h2>Glossary</h2>
<p class="small">{html.escape(_INTERVALS)}</p>
<table id="glossary"><tbody>{glossary_rows}</tbody></table>
</details>
<p class="small">Plots show the whole grid; the filters change the tables. Written by fire-bench; works offline.</p>
<script type="application/json" id="page-data">{embedded}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
