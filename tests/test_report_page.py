"""The report's page as a person sees it: headless Chromium at a laptop's 1,280 px, offline.

The report is built on the tiny planted model and opened from disk. The page must be no wider than
the window (a wide table scrolls in its own box, the figures take the page's width), its findings
must show at the top in a few plain sentences, and the summary's full sentences must wait,
collapsed, until the reader clicks them open. The shared page builder gets the same check on a
table far wider than the window.

Skipped, with the reason, where Chromium or chromedriver is missing (``apt-get install chromium
chromium-driver``; ``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import time

import pandas as pd
import plotly.graph_objects as go
import pytest

from conftest import SINK_LAYER, SINK_NEURON, headless_chromium, needs_chromium
from sinklens import ReportConfig, run_report
from sinklens.present.page import TABLE_BOX, page, section

pytestmark = needs_chromium

WINDOW = 1280  # px, a laptop's window
DRAW_SECONDS = 60

# Whether the page fits its window: the page's own width, the elements whose box runs past the right
# edge of the viewport outside any box that scrolls sideways, and each table's box.
FIT = """
const edge = document.documentElement.clientWidth;
const scrolls = e => {
  for (let a = e.parentElement; a; a = a.parentElement) {
    const x = getComputedStyle(a).overflowX;
    if (x === 'auto' || x === 'scroll') return true;
  }
  return false;
};
const past = [...document.body.querySelectorAll('*')]
  .filter(e => e.getClientRects().length && e.getBoundingClientRect().right > edge + 0.5);
const tables = [...document.querySelectorAll('table')];
return JSON.stringify({
  page: document.documentElement.scrollWidth, window: window.innerWidth, edge: edge,
  outside: past.filter(e => !scrolls(e)).map(e => e.tagName + '.' + (e.getAttribute('class') || '')
    + ' right ' + Math.round(e.getBoundingClientRect().right)),
  unboxed: tables.filter(t => !t.closest('.TABLE_BOX')).length,
  scrolling: tables.filter(t => t.parentElement.scrollWidth > t.parentElement.clientWidth + 1)
    .length,
  figures: [...document.querySelectorAll('.js-plotly-plot')]
    .map(p => Math.round(p.getBoundingClientRect().right)),
  body: Math.round(document.body.getBoundingClientRect().right),
});
""".replace("TABLE_BOX", TABLE_BOX)
DRAWN = """
const plots = [...document.querySelectorAll('.js-plotly-plot')];
return document.readyState === 'complete' && plots.length > 0
  && plots.every(p => p.querySelector('.main-svg') !== null);
"""


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium, a 1,280 px window, that resolves no host (the pages open offline)."""
    with headless_chromium(tmp_path / "last.png", width=WINDOW) as driver:
        yield driver


def _open(browser, path) -> None:
    browser.get(path.as_uri())
    deadline = time.monotonic() + DRAW_SECONDS
    while not browser.execute_script(DRAWN):
        assert time.monotonic() < deadline, "the page's figures did not draw"
        time.sleep(0.25)
    time.sleep(0.5)  # the responsive figures settle to the page's width


def _fits(browser) -> dict:
    fit = json.loads(browser.execute_script(FIT))
    assert fit["window"] == WINDOW
    assert fit["page"] <= fit["window"], (
        f"the page is {fit['page']} px wide in a {WINDOW} px window"
    )
    assert fit["outside"] == [], f"past the right edge, outside a scroll box: {fit['outside'][:10]}"
    assert fit["unboxed"] == 0, "a table outside a box that scrolls sideways"
    assert all(right <= fit["body"] + 1 for right in fit["figures"]), (
        f"a figure is wider than the page: {fit}"
    )
    return fit


def test_the_report_reads_at_a_glance_in_a_1280_px_window(
    tiny, tiny_dir, long_corpus_file, tmp_path, browser
):
    from selenium.webdriver.common.by import By

    config = ReportConfig(
        model=str(tiny_dir),
        words=["the", "you"],
        n_repeats=30,
        corpus=str(long_corpus_file),
        corpus_chars=600,
    )
    results = run_report(config, tmp_path / "report", model=tiny)
    _open(browser, tmp_path / "report" / "report.html")
    _fits(browser)

    findings = browser.find_element(By.CSS_SELECTOR, "ul.findings")
    assert findings.is_displayed()
    assert findings.rect["y"] < browser.execute_script("return window.innerHeight"), (
        "the findings are not on the first screen"
    )
    lines = [li.text for li in findings.find_elements(By.CSS_SELECTOR, "li")]
    assert 3 <= len(lines) <= 6 and all(len(line) < 400 for line in lines), lines
    assert lines[0].startswith("The sink is the first token, '<s>' (the tokenizer's BOS token)")
    assert f"at layer {SINK_LAYER} by one MLP neuron, {SINK_NEURON}:" in lines[1]
    assert any(
        "the token, not of position 0" in line for line in lines
    )  # the tiny model has no mark
    assert lines[-1].startswith("For comparison, the paper (Yona et al. 2025, Table 1)")

    details = browser.find_element(By.CSS_SELECTOR, "details")
    sentences = details.find_elements(By.CSS_SELECTOR, "li")
    assert [s.get_attribute("textContent") for s in sentences] == results["summary"]
    assert details.get_attribute("open") is None
    assert not any(s.is_displayed() for s in sentences), "the details show before a click"
    assert details.rect["y"] > findings.rect["y"]

    details.find_element(By.CSS_SELECTOR, "summary").click()
    assert details.get_attribute("open") is not None
    assert all(s.is_displayed() for s in sentences), "the details do not show after a click"
    assert [s.text for s in sentences] == results["summary"]
    _fits(browser)  # the full sentences wrap inside the page


def test_every_page_fits_a_wide_table_in_its_own_scroll_box(tmp_path, browser):
    wide = pd.DataFrame({f"a rather long column name {i}": [i * 1.5, -i] for i in range(60)})
    figure = go.Figure(go.Scatter(y=[1, 3, 2], name="a trace"))
    figure.update_layout(title="A figure the width of the page")
    text = page(
        "A page of the shared builder",
        "<code>" + "an_unbroken_identifier_" * 20 + "</code>",
        ["one summary line, " * 30],
        [section("A wide table", "Sixty columns.", figure, frame=wide)],
    )
    (tmp_path / "page.html").write_text(text)
    _open(browser, tmp_path / "page.html")
    fit = _fits(browser)
    assert fit["scrolling"] == 1, "the wide table does not scroll in its box"
    assert min(fit["figures"]) > WINDOW // 2, "the figure does not take the page's width"
