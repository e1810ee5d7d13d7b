"""report.html: one self-contained page, checked in a real browser (headless Chromium).

The browser tests skip, saying why, where no Chromium is installed (`.ci/run` installs
Debian's `chromium`). The page's own ``#selftest=COLUMN`` check clicks a header twice and
writes the column and every image's natural size into the DOM, which ``--dump-dom`` returns.
"""
from __future__ import annotations

import html as html_lib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx.report import REPORT_COLUMNS, write_report
from featx.report.html import PER_GROUP_COLUMNS, html_columns
from featx.results import METRIC_COLUMNS
from tests.builders import TILES
from tests.builders import dataset_record as _dataset
from tests.builders import write_head_result as _head

# mistakes per class (20 test images per class): distinct balanced accuracies, so that the
# sorted order is unambiguous
HEADS = {("penultimate", "logistic"): (3, 5, 4), ("pool1", "svm"): (4, 5, 6),
         ("pool2", "logistic"): (2, 3, 3), ("pool2", "linear"): (6, 6, 7),
         ("pool4", "svm"): (1, 2, 2)}
# a dataset and class name from a user's folder that would be markup if not escaped (it sorts
# after tiles, whose table comes first)
NASTY = 'z<script>alert("x")</script>&'


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


BROWSER = _browser()
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="no headless Chromium on PATH (Debian: apt-get install chromium; "
    ".ci/run installs it)")


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    # --virtual-time-budget: headless waits until the page's load handler has run;
    # its own profile folder, so parallel runs and a user's browser never share one
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}",
           "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    tiles = _dataset("tiles", TILES)
    for (feature, head), wrong in HEADS.items():
        _head(root, tiles, feature, head, wrong)
    nasty = _dataset(NASTY, ("a<b", "c&d"))
    _head(root, nasty, "pool2", "logistic", (2, 3), cache="nasty_resnet18_imagenet_224")
    written = write_report(root)
    return root, written


def test_report_html_is_written_and_self_contained(report):
    root, written = report
    page = Path(written["html"]).read_text(encoding="utf-8")
    assert written["html"] == root / "report" / "report.html"
    # no file or network read: every image is a data URI, no external script/style/font
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert not re.search(r"<link\b|@import|url\(", page)
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert len(srcs) == sum(1 for p in written["plot"])


def test_every_report_column_is_a_table_column(report):
    _, written = report
    page = Path(written["html"]).read_text(encoding="utf-8")
    first = page[page.index("<table"):page.index("</table>")]
    cols = re.findall(r'<th data-col="([^"]+)"', first)
    assert cols == [c for c in REPORT_COLUMNS if c not in PER_GROUP_COLUMNS] == html_columns()
    # the columns only the section title states are the per-group ones
    assert PER_GROUP_COLUMNS == {
        "group", "comparable", "reason", "dataset", "split_fingerprint", "test_fingerprint"}
    for c in METRIC_COLUMNS:
        assert f">{html_lib.escape(c.header)}</th>" in first


def test_a_new_column_appears_without_edits(monkeypatch, tmp_path):
    """A column added to the shared table (as the interval columns are) shows up by itself."""
    import featx.report.write as write_mod
    root = tmp_path / "results"
    _head(root, _dataset("tiles", TILES), "pool2", "logistic", (2, 3, 3))
    i = write_mod.REPORT_COLUMNS.index("test_balanced_accuracy") + 1
    monkeypatch.setattr(write_mod, "REPORT_COLUMNS", write_mod.REPORT_COLUMNS[:i]
                        + ["test_balanced_accuracy_lo"] + write_mod.REPORT_COLUMNS[i:])
    written = write_report(root)
    page = Path(written["html"]).read_text(encoding="utf-8")
    assert 'data-col="test_balanced_accuracy"' in page
    after = page[page.index('data-col="test_balanced_accuracy"'):]
    assert re.match(r'data-col="test_balanced_accuracy"[^<]*</th><th data-col='
                    r'"test_balanced_accuracy_lo" title="test_balanced_accuracy_lo">'
                    r"bal\. acc lo</th>", after), after[:200]
    # and the same column in report.csv, from the same list
    assert "test_balanced_accuracy_lo" in Path(written["csv"]).read_text().splitlines()[0]


def test_names_from_user_folders_are_escaped(report):
    _, written = report
    page = Path(written["html"]).read_text(encoding="utf-8")
    assert NASTY not in page and "a<b" not in page
    assert html_lib.escape(NASTY) in page
    assert page.count("<script>") == 1  # the page's own


def test_each_row_links_to_its_result_json(report):
    root, written = report
    out = Path(written["html"]).parent
    page = Path(written["html"]).read_text(encoding="utf-8")
    hrefs = [html_lib.unescape(h) for h in re.findall(r'<a href="([^"]+)"', page)]
    assert len(hrefs) == len(HEADS) + 1
    for h in hrefs:
        assert not os.path.isabs(h) and h.endswith(".json")
        assert json.loads((out / h).read_text())["schema"] == "featx-result/1"


@needs_browser
def test_in_a_browser_rows_sort_on_a_header_click_and_images_decode(report, tmp_path):
    _, written = report
    url = Path(written["html"]).as_uri() + "#selftest=test_balanced_accuracy"
    dom = _chromium("--dump-dom", url, tmp=tmp_path).stdout
    found = re.search(r'<pre id="featx-selftest">(.*?)</pre>', dom, re.S)
    assert found, f"the page's self-check did not run; DOM starts: {dom[:300]!r}"
    check = json.loads(html_lib.unescape(found.group(1)))
    # the first table is tiles' group: one row per head result, ranked best first
    assert check["rows"] == len(HEADS)
    before = [float(v) for v in check["before"]]
    assert before == sorted(before, reverse=True)
    ascending, descending = ([float(v) for v in click] for click in check["clicks"])
    assert ascending == sorted(before) and descending == sorted(before, reverse=True)
    assert len(set(before)) == len(HEADS)  # distinct values: the order is unambiguous
    assert len(check["images"]) == len(written["plot"])
    for img in check["images"]:
        # painted: opaque pixels of the image drawn at 64x64; a plot covers all of them
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img
        assert img["painted"] == 64 * 64, img


@needs_browser
def test_in_a_browser_the_page_is_not_blank(report, tmp_path):
    _, written = report
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,900",
              Path(written["html"]).as_uri(), tmp=tmp_path)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (900, 1280)
    # a blank page is one grey level (std 0); text, table rules and plots give far more
    assert pixels.std() > 10, pixels.std()
    assert (pixels < 128).mean() > 0.005  # dark ink: text and plot lines


def test_the_lines_above_report_mds_first_section_open_the_page(tmp_path):
    """Whatever summary or verdict report.md puts before its first section leads the page."""
    from featx.report import load_results, rank_results, write_html
    root = tmp_path / "results"
    _head(root, _dataset("tiles", TILES), "pool2", "logistic", (2, 3, 3))
    md = ("# featx report\n\n3 result(s) under `results`.\n\n"
          "> Fine-tuning is **not** worth it on <tiles>.\n\n- a note & more\n\n## tiles\n\nlater")
    page = write_html(tmp_path / "r.html", rank_results(load_results(root)), markdown=md,
                      plots={}, curves=[], problems=[], notes=[]).read_text()
    top = page[:page.index("<section>")]
    assert "<p>3 result(s) under <code>results</code>.</p>" in top
    assert ('<p class="verdict">Fine-tuning is <strong>not</strong> worth it on '
            "&lt;tiles&gt;.</p>") in top
    assert "<ul><li>a note &amp; more</li></ul>" in top
    assert "later" not in page
