"""The explorer notebook in a real browser: JupyterLab under headless Chromium, offline.

The test starts JupyterLab on 127.0.0.1 (a free port, a token, no browser of its own) over a copy of
``analyses/explore.ipynb``, with the notebook set to the tiny planted model, and drives Debian's
Chromium through chromedriver as a person would: it opens the notebook, runs every cell, then on
the stop with the repeat slider drags the slider, types another layer and clicks the patch toggle.
After each change it reads what the page draws (the plotly figures' SVG paths and the circuitsvis
pattern inside its frame) and fails if a view that should follow the change did not, or if the
pattern view never drew. Chromium resolves no host but 127.0.0.1, so anything fetched from a
network (circuitsvis or plotly from a CDN) would leave a view blank. The window is 1,280 px wide, a laptop's:
no view may be wider than the output area it sits in, and the pattern's frame must hold its last row.

Skipped, with the reason, where Chromium or chromedriver is missing (``apt-get install chromium
chromium-driver``; ``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import headless_chromium, needs_chromium

pytestmark = needs_chromium

NOTEBOOK = Path(__file__).parent.parent / "analyses" / "explore.ipynb"
N_STOPS = 5
STARTUP_SECONDS = 90  # JupyterLab, then the page
RUN_SECONDS = 240  # every cell, including the kernel's start and kaleido's still images
UPDATE_SECONDS = 60  # one change in the explorer, on a CPU shared with other tests

# What a view looks like in the page, as a string that changes when the view does.
FIGURE_PRINT = """
const plot = arguments[0];
const paths = [...plot.querySelectorAll('.scatterlayer path.js-line, .shapelayer path')].map(p => p.getAttribute('d'));
const legend = [...plot.querySelectorAll('.legendtext')].map(t => t.textContent);
return JSON.stringify([paths, legend]);
"""
PATTERN_PRINT = """
const frame = arguments[0].contentDocument;
if (!frame || !frame.body) return null;
const drawn = [...frame.querySelectorAll('[id^="pattern-"]')];
if (drawn.length === 0 || drawn.some(d => d.childElementCount === 0)) return null;  // circuitsvis has not drawn
const canvases = [...frame.querySelectorAll('canvas')].map(c => c.toDataURL());
return JSON.stringify([frame.body.innerText, drawn.map(d => d.innerHTML), canvases]);
"""
LAYOUT = """
const root = arguments[0];
const area = root.closest('.jp-OutputArea-output') || root.parentElement;
const right = area.getBoundingClientRect().right + 1;
const views = [...root.querySelectorAll('.js-plotly-plot, iframe')].filter(v => v.offsetParent !== null);
const wide = views.filter(v => v.getBoundingClientRect().right > right).map(v => v.tagName + '.' + v.className);
const frame = root.querySelector('iframe');
const page = frame && frame.contentDocument && frame.contentDocument.documentElement;
return JSON.stringify({wide: wide, overflow: area.scrollWidth > area.clientWidth + 1,
                       cut: page ? page.scrollHeight > frame.clientHeight + 1 : null});
"""
KERNEL_IDLE = """
const panel = window.jupyterapp.shell.currentWidget;
const kernel = panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
return kernel ? kernel.status === 'idle' && !panel.sessionContext.pendingInput : false;
"""

CELL_ERROR = """
for (const cell of window.jupyterapp.shell.currentWidget.content.widgets) {
  const outputs = cell.model.type === 'code' ? cell.model.outputs.toJSON() : [];
  const error = outputs.find(o => o.output_type === 'error');
  if (error) return `${error.ename}: ${error.evalue}`;
}
return null;
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition, seconds: float, what, interval: float = 0.5):
    """``condition()`` once it is true; ``what`` (a string, or a function giving one) names it in the timeout."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {seconds:.0f} s waiting for {what() if callable(what) else what}"
    )


@pytest.fixture
def lab(tmp_path, tiny_dir, long_corpus_file):
    """JupyterLab serving a copy of the explorer notebook, its kernels on the tiny planted model."""
    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    port, token = _free_port(), os.urandom(16).hex()
    env = {
        **os.environ,
        "SINKLENS_MODEL": str(tiny_dir),
        "SINKLENS_CORPUS": str(long_corpus_file),
        "SINKLENS_CORPUS_CHARS": "600",
        "SINKLENS_N_REPEATS": "40",
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--allow-root",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    no_news = (
        tmp_path
        / "settings"
        / "@jupyterlab"
        / "apputils-extension"
        / "notification.jupyterlab-settings"
    )
    no_news.parent.mkdir(parents=True)
    no_news.write_text(
        json.dumps({"fetchNews": "false"})
    )  # no "get Jupyter news?" prompt over the page
    log = (tmp_path / "jupyterlab.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def answering():
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                return True
        except OSError:
            assert server.poll() is None, (
                f"JupyterLab exited: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}"
            )
            return False

    try:
        _wait(answering, STARTUP_SECONDS, "JupyterLab to answer")
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium that resolves no host but 127.0.0.1 (JupyterLab's)."""
    with headless_chromium(
        tmp_path / "last.png", host_rules="MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
    ) as driver:
        yield driver


class ExplorerInPage:
    """One explorer's controls and views as the page shows them."""

    def __init__(self, driver, element):
        self.driver, self.element = driver, element

    def _find(self, css: str):
        from selenium.webdriver.common.by import By

        return [e for e in self.element.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]

    def control(self, description: str):
        """The input of the control labelled ``description``."""
        from selenium.webdriver.common.by import By

        for box in self._find(".widget-inline-hbox"):
            labels = box.find_elements(By.CSS_SELECTOR, "label")
            if labels and labels[0].text.strip() == description:
                return box
        raise AssertionError(f"no visible control labelled {description!r}")

    def views(self) -> dict[str, str | None]:
        """Each view's print; None for a view not drawn (yet)."""
        plots, frames = self._find(".js-plotly-plot"), self._find("iframe")
        prints = (
            [self.driver.execute_script(FIGURE_PRINT, plot) for plot in plots]
            if len(plots) == 3
            else [None] * 3
        )
        pattern = self.driver.execute_script(PATTERN_PRINT, frames[0]) if len(frames) == 1 else None
        return dict(zip(("norm", "attention", "neurons"), prints)) | {"pattern": pattern}

    def message(self) -> str:
        return " ".join(
            e.text
            for e in self._find(".widget-html-content")
            if "color:firebrick" in (e.get_attribute("innerHTML") or "")
        )


def _settled(driver, explorer: ExplorerInPage, before: dict, changing: set[str], what: str) -> dict:
    """Wait until the kernel is idle and every view in ``changing`` differs from ``before``."""

    def updated():
        if not driver.execute_script(KERNEL_IDLE):
            return None
        now = explorer.views()
        return (
            now
            if all(now[name] is not None and now[name] != before[name] for name in changing)
            else None
        )

    try:
        return _wait(updated, UPDATE_SECONDS, what)
    except AssertionError:
        now = explorer.views()
        stale = sorted(name for name in changing if now[name] is None or now[name] == before[name])
        raise AssertionError(
            f"{what}: the {', '.join(stale)} view(s) did not update "
            f"(message: {explorer.message() or 'none'})"
        ) from None


def test_running_the_explorer_notebook_and_moving_its_controls_updates_the_views(lab, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, token = lab
    browser.get(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
    _wait(
        lambda: browser.execute_script(
            "return !!(window.jupyterapp && window.jupyterapp.shell.currentWidget"
            " && window.jupyterapp.shell.currentWidget.sessionContext"
            " && window.jupyterapp.shell.currentWidget.sessionContext.session"
            " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel)"
        ),
        STARTUP_SECONDS,
        "the notebook and its kernel",
    )
    _wait(lambda: browser.execute_script(KERNEL_IDLE), STARTUP_SECONDS, "the kernel to start")
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")

    def all_stops_drawn():
        explorers = browser.find_elements(By.CSS_SELECTOR, ".sinklens-explorer")
        error = browser.execute_script(CELL_ERROR)
        assert error is None, f"a cell failed: {error}"
        if len(explorers) < N_STOPS or not browser.execute_script(KERNEL_IDLE):
            return None
        return explorers

    explorers = _wait(
        all_stops_drawn, RUN_SECONDS, f"the notebook's {N_STOPS} explorers", interval=1
    )
    for number, element in enumerate(explorers, start=1):  # each stop draws its four views, offline
        stop = ExplorerInPage(browser, element)
        browser.execute_script("arguments[0].scrollIntoView()", element)
        assert stop.message() == "", f"stop {number} shows a problem: {stop.message()}"
        _wait(
            lambda stop=stop: all(stop.views().values()),
            UPDATE_SECONDS,
            lambda stop=stop, number=number: (
                f"stop {number}'s views (undrawn: {', '.join(n for n, v in stop.views().items() if v is None)})"
            ),
        )
        layout = json.loads(browser.execute_script(LAYOUT, element))
        assert layout == {"wide": [], "overflow": False, "cut": False}, (
            f"stop {number} does not fit 1280 px: {layout}"
        )
    repeat_stops = [
        ExplorerInPage(browser, e)
        for e in explorers
        if any(s.is_displayed() for s in e.find_elements(By.CSS_SELECTOR, ".widget-hslider"))
    ]
    assert repeat_stops, "no stop opens on the repeat slider"
    stop = repeat_stops[0]
    browser.execute_script("arguments[0].scrollIntoView()", stop.element)
    before = stop.views()

    slider = stop.control("repeats")
    readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout").text
    handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle")
    ActionChains(browser).click_and_hold(handle).move_by_offset(60, 0).release().perform()
    assert slider.find_element(By.CSS_SELECTOR, ".widget-readout").text != readout, (
        "the slider did not move"
    )
    after_slider = _settled(
        browser,
        stop,
        before,
        {"norm", "attention", "neurons", "pattern"},
        "moving the repeat slider",
    )

    layer_input = stop.control("layer").find_element(By.CSS_SELECTOR, "input")
    layer = int(layer_input.get_attribute("value"))
    layer_input.send_keys(Keys.CONTROL, "a")
    layer_input.send_keys(str(0 if layer != 0 else 1), Keys.ENTER)
    after_layer = _settled(
        browser, stop, after_slider, {"attention", "pattern"}, "changing the layer"
    )
    assert (after_layer["norm"], after_layer["neurons"]) == (
        after_slider["norm"],
        after_slider["neurons"],
    ), "the norm and neuron views do not depend on the layer, yet they changed"

    toggle = next(
        b
        for b in stop.element.find_elements(By.CSS_SELECTOR, "button")
        if b.text.strip() == "patched"
    )
    toggle.click()
    after_patch = _settled(
        browser,
        stop,
        after_layer,
        {"norm", "attention", "neurons", "pattern"},
        "toggling the patch",
    )
    assert "patched" in json.loads(after_patch["norm"])[1], "the norm view has no patched trace"
    assert stop.message() == ""
