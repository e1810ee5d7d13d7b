"""``report.html``: the report as one self-contained page.

The page carries everything it shows: the PNG plots are embedded as base64 ``data:`` URIs and
the CSS and the table sorting are inline, so the file opens from a shared drive, an e-mail
attachment or a machine without network access, and reads nothing but itself (the only
links are to the result JSON files, relative, for whoever has the results folder).

It is rendered from the same rows and the same column list as report.csv
(:data:`~featx.report.write.REPORT_COLUMNS`, read at write time, whose metrics come from
:data:`featx.results.METRIC_COLUMNS`): every column is shown, so a column added there appears
here without an edit. The lines report.md has between its title and its first section (the
summary, and whatever verdict the report writes there) open the page. Every text is escaped:
dataset, class and model names come from the user's folders.

A header click sorts its table (numbers as numbers, empty cells last; again: the other way).
``report.html#selftest=COLUMN`` runs a small check in the page itself, for the tests: it
clicks that column's header twice and writes the column's cells after each click, and the
natural size of every image and how much of it paints on a canvas, into ``<pre id="featx-selftest">``.
"""
from __future__ import annotations

import base64
import html
import math
import os
import re
from pathlib import Path
from typing import Sequence

from featx.files import atomic_write
from featx.report.ranking import COMPARABLE_RULE, RANK_RULE, WALL_TIME_RULE
from featx.report import write as _write
from featx.report.tables import group_title, ranked_groups
from featx.results import METRIC_COLUMNS

__all__ = ["PER_GROUP_COLUMNS", "column_header", "html_columns", "write_html"]

# Columns the section title already states for every row of a group; the rest of
# REPORT_COLUMNS, in its order, is the table. ``source`` becomes the link to the JSON.
PER_GROUP_COLUMNS = frozenset({"group", "comparable", "reason", "dataset",
                               "split_fingerprint", "test_fingerprint"})

_HEADERS = {c.name: c.header for c in METRIC_COLUMNS}
_FORMATS = {c.name: c.fmt for c in METRIC_COLUMNS}


def html_columns() -> list[str]:
    """The table's columns: report.csv's (``REPORT_COLUMNS``, read when called) in order,
    less :data:`PER_GROUP_COLUMNS`."""
    return [c for c in _write.REPORT_COLUMNS if c not in PER_GROUP_COLUMNS]


def column_header(name: str) -> str:
    """The header shown for a report column: the metric's header, else the column name.

    ``test_balanced_accuracy`` is ``bal. acc``; a derived column such as
    ``test_balanced_accuracy_lo`` is ``bal. acc lo``; any other keeps its CSV name.
    """
    if name in _HEADERS:
        return _HEADERS[name]
    for key, header in _HEADERS.items():
        if name.startswith(key + "_"):
            return f"{header} {name[len(key) + 1:].replace('_', ' ')}"
    return name.replace("_", " ")


def _fmt_for(name: str) -> str:
    for key, fmt in _FORMATS.items():
        if name == key or name.startswith(key + "_"):
            return fmt
    return ".2f" if name.endswith("_s") else ".4g"


def _cell(name: str, value) -> tuple[str, str]:
    """(text shown, sort key) of one cell; the key is a number as text or the text itself."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–", ""
    if isinstance(value, bool):
        return str(value), str(value)
    if isinstance(value, (int, float)):
        text = str(value) if isinstance(value, int) else format(value, _fmt_for(name))
        return text, repr(float(value))
    if isinstance(value, (list, tuple)):
        value = ", ".join(map(str, value))
    return str(value), str(value)


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _inline(text: str) -> str:
    """Escaped text with report.md's inline marks: **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _preface(markdown: str) -> list[str]:
    """report.md's lines between its title and its first ``##`` section, as HTML blocks."""
    lines = markdown.splitlines()
    body = []
    for line in lines[1:]:
        if line.startswith("## "):
            break
        body.append(line)
    blocks, items = [], []
    for line in body + [""]:
        if line.startswith(("- ", "* ")):
            items.append(f"<li>{_inline(line[2:])}</li>")
            continue
        if items:
            blocks.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if line.startswith("> "):
            blocks.append(f'<p class="verdict">{_inline(line[2:])}</p>')
        elif line.strip() and not line.startswith("#"):
            blocks.append(f"<p>{_inline(line)}</p>")
    return blocks


def _table(members: list[dict], out: Path) -> str:
    columns = html_columns()
    head = "".join(f'<th data-col="{html.escape(c)}" title="{html.escape(c)}">'
                   f"{html.escape(column_header(c))}</th>" for c in columns)
    rows = []
    for r in members:
        cells = []
        for c in columns:
            text, key = _cell(c, r.get(c))
            if c == "source" and r.get("path") is not None:
                href = os.path.relpath(r["path"], out).replace(os.sep, "/")
                shown = f'<a href="{html.escape(href)}">{html.escape(text)}</a>'
            else:
                shown = html.escape(text)
            num = ' class="num"' if key and _is_number(key) and c != "source" else ""
            cells.append(f'<td data-v="{html.escape(key)}"{num}>{shown}</td>')
        best = ' class="best"' if r.get("best") else ""
        rows.append(f"<tr{best}>" + "".join(cells) + "</tr>")
    return (f'<table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _figures(paths: Sequence[Path]) -> str:
    return "".join(f'<figure><img src="{_png_uri(p)}" alt="{html.escape(p.stem)}">'
                   f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in paths)


def _section(title: str, members: list[dict], plots: Sequence[Path], out: Path,
             level: int = 2) -> str:
    plots_html = f'<div class="plots">{_figures(plots)}</div>' if plots else ""
    return (f"<section><h{level}>{html.escape(title)}</h{level}>"
            f'<div class="{"side" if plots else ""}"><div class="tablewrap">'
            f"{_table(members, out)}</div>"
            f"{plots_html}</div></section>")


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222;
background:#fff}
h1{font-size:1.6em;margin:0 0 .4em}h2{font-size:1.2em;margin:1.6em 0 .5em}
.verdict{font-size:1.1em;border-left:4px solid #3465a4;padding:.3em .8em;background:#eef3fa}
.side{display:grid;grid-template-columns:minmax(0,1fr) 380px;gap:1.2em;align-items:start}
@media (max-width:1000px){.side{grid-template-columns:minmax(0,1fr)}}
.side .plots{flex-direction:column}.side figure img{max-width:100%}
.tablewrap{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:13px}
th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;white-space:nowrap}
th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#fff7d6;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:.8em}
figure{margin:0}figure img{max-width:420px;height:auto;border:1px solid #eee}
figcaption{font-size:12px;color:#666}
code{background:#f3f3f3;padding:0 3px}
"""

# Vanilla JS: sort on a header click; and the self-check the tests read through --dump-dom.
_JS = r"""
function featxSort(th, dir) {
  const table = th.closest('table'), body = table.tBodies[0];
  const i = Array.prototype.indexOf.call(th.parentNode.children, th);
  const rows = Array.from(body.rows);
  const keys = rows.map(r => r.cells[i].dataset.v);
  const numeric = keys.every(k => k === '' || !isNaN(parseFloat(k)));
  if (dir === undefined) dir = th.classList.contains('asc') ? -1 : 1;
  const order = rows.map((r, n) => n).sort((a, b) => {
    const x = keys[a], y = keys[b];
    if (x === '' || y === '') return (x === '') - (y === '') || a - b;  // empty last
    const c = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
    return c * dir || a - b;
  });
  order.forEach(n => body.appendChild(rows[n]));
  th.parentNode.querySelectorAll('th').forEach(h => h.classList.remove('asc', 'desc'));
  th.classList.add(dir > 0 ? 'asc' : 'desc');
}
document.querySelectorAll('table.sortable th').forEach(th =>
  th.addEventListener('click', () => featxSort(th)));
window.addEventListener('load', () => {
  const m = location.hash.match(/^#selftest=(.+)$/);
  if (!m) return;
  const col = decodeURIComponent(m[1]), out = {column: col, clicks: [], images: []};
  const table = document.querySelector('table.sortable');
  const th = Array.from(table.tHead.rows[0].cells).find(h => h.dataset.col === col);
  const i = Array.prototype.indexOf.call(th.parentNode.children, th);
  const column = () => Array.from(table.tBodies[0].rows).map(r => r.cells[i].dataset.v);
  out.before = column();
  out.rows = table.tBodies[0].rows.length;
  for (let k = 0; k < 2; k++) { th.click(); out.clicks.push(column()); }
  // drawn onto a canvas: a PNG whose header gave a size but whose data does not decode is
  // 'broken' (drawImage throws) or paints nothing
  for (const img of document.querySelectorAll('img')) {
    const canvas = document.createElement('canvas');
    canvas.width = 64; canvas.height = 64;
    const ctx = canvas.getContext('2d');
    let painted = 0;
    try {
      ctx.drawImage(img, 0, 0, 64, 64);
      const a = ctx.getImageData(0, 0, 64, 64).data;
      for (let p = 3; p < a.length; p += 4) if (a[p] > 0) painted++;
    } catch (e) { painted = -1; }
    out.images.push({alt: img.alt, complete: img.complete, painted: painted,
                     width: img.naturalWidth, height: img.naturalHeight});
  }
  const pre = document.createElement('pre');
  pre.id = 'featx-selftest';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
"""


def write_html(path: str | Path, ranked: Sequence[dict], *, markdown: str,
               plots: dict[str, list[Path]], curves: Sequence[Path],
               problems: Sequence[tuple[str, str]], notes: Sequence[str]) -> Path:
    """Write ``report.html`` beside report.md; return its path.

    Parameters
    ----------
    path : str or Path
        The file to write (atomically); links to result JSON files are relative to its folder.
    ranked : sequence of dict
        The rows of :func:`~featx.report.ranking.rank_results`, in their order.
    markdown : str
        The text of report.md: its lines before the first section open the page.
    plots : dict of str to list of Path
        The PNG figures of each main group (keyed by group name), shown beside its table.
    curves : sequence of Path
        The fine-tuning curves.
    problems : sequence of (str, str)
        Result files that could not be read, and why.
    notes : sequence of str
        Remarks (skipped plots, ...).
    """
    path = Path(path)
    out = path.parent
    groups = ranked_groups(ranked)
    parts = ["<h1>featx report</h1>", *_preface(markdown)]
    for members in groups:
        if members[0]["comparable"]:
            parts.append(_section(group_title(members), members,
                                  plots.get(members[0]["group"], []), out))
    others = [g for g in groups if not g[0]["comparable"]]
    if others:
        parts.append("<h2>Not comparable</h2><p>These results were scored on another split "
                     "than the main group of their dataset, so they are ranked only among "
                     "themselves.</p>")
        parts += [_section(group_title(m), m, [], out, level=3) for m in others]
    if curves:
        parts.append(f'<h2>Fine-tuning curves</h2><div class="plots">{_figures(curves)}</div>')
    if problems:
        parts.append(f"<h2>Files that could not be read ({len(problems)})</h2><ul>"
                     + "".join(f"<li><code>{html.escape(str(p))}</code>: {html.escape(why)}"
                               "</li>" for p, why in problems) + "</ul>")
    if notes:
        parts.append("<h2>Notes</h2><ul>"
                     + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>How to read this report</h2><ul>"
                 f"<li><strong>Ranking:</strong> {html.escape(RANK_RULE)}</li>"
                 f"<li><strong>Wall time:</strong> {html.escape(WALL_TIME_RULE)}</li>"
                 f"<li><strong>Comparability:</strong> {html.escape(COMPARABLE_RULE)}</li>"
                 "<li>Click a column header to sort its table; click again for the other "
                 "order. The last column links to each row's result JSON.</li></ul>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            # nothing from the network: no fonts, scripts or images but the inline ones
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            f"<title>featx report</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts) + f"\n<script>{_JS}</script>\n</body></html>\n")
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    return path
