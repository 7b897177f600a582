"""The real app in a real browser: starts ``streamlit run app/main.py`` and drives headless Chromium
through the journey a newcomer takes (load, score, toggle by clicking the switchboard, search,
download the plan), and through comparing importance metrics and putting four strategies on one
frontier with measured prefill speedup. Screenshots of every page go to ``$SHEDDER_SCREENSHOTS`` (default: a temp dir).

Needs Debian's ``chromium`` and the ``playwright`` Python package (no ``playwright install``: the
system browser is used); skipped with the reason when either is missing.
"""
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

from shedder.api import REGISTRY
from shedder.formats.loading import BUNDLED_MODELS, DEFAULT_MODEL

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
LONG = 180_000  # ms: importance and search on a shared 2-core CI machine

if CHROMIUM is None:
    pytest.skip("Debian chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
if not (BUNDLED_MODELS / DEFAULT_MODEL / "config.json").is_file() and not os.environ.get("SHEDDER_MODEL"):
    pytest.skip(f"the bundled {DEFAULT_MODEL} model is missing from {BUNDLED_MODELS}", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app served by the real ``streamlit run`` on a free port; yields its URL."""
    port = free_port()
    env = {**os.environ, "SHEDDER_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
           "SHEDDER_EXPORT_ROOT": str(tmp_path_factory.getbasetemp())}  # saves go inside it; tests' tmp_path is
    log = open(tmp_path_factory.mktemp("server") / "streamlit.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
                             "--server.port", str(port), "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"streamlit did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    out = Path(os.environ.get("SHEDDER_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def page(server):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 2200}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(LONG)
        pg.goto(server)
        yield pg
        browser.close()


def idle(page) -> None:
    """Wait until the script run triggered by the last action has finished and tables are drawn."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(timeout=LONG)
    page.wait_for_timeout(500)


def go(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
    page.get_by_role("heading", name=title).first.wait_for()
    idle(page)


def click(page, point) -> None:
    """Click a plotly point the way a user does (hover, then click at its centre)."""
    box = point.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.wait_for_timeout(200)
    page.mouse.click(x, y)


def metric(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]', has=page.get_by_text(label, exact=True)).first
    return box.locator('[data-testid="stMetricValue"]').inner_text()


def no_errors(page) -> None:
    errors = page.locator('[data-testid="stAlertContentError"], [data-testid="stException"]')
    assert errors.count() == 0, errors.all_inner_texts()


def test_newcomer_journey(page, screenshots, tmp_path):
    # Model: defaults load by themselves, with the baseline numbers.
    page.get_by_text("perplexity", exact=True).first.wait_for()
    idle(page)
    no_errors(page)
    assert float(metric(page, "perplexity")) > 1
    page.screenshot(path=str(screenshots / "1_model.png"))

    # Importance: start scoring the default kinds, cancel, then score them to the end.
    go(page, "Importance")
    page.get_by_role("button", name="Compute importance").click()
    page.locator('[data-testid="stProgress"]').first.wait_for()
    page.get_by_role("button", name="Cancel").first.click()  # the one beside Compute importance
    page.get_by_text("Cancelled.").first.wait_for()
    idle(page)
    assert page.get_by_text("All scores").count() == 0
    page.get_by_role("button", name="Compute importance").click()
    page.get_by_text("All scores").wait_for()
    idle(page)
    no_errors(page)
    page.screenshot(path=str(screenshots / "2_importance.png"))

    # Prune: click the first square of the switchboard (block 0) and watch perplexity move.
    go(page, "Prune")
    before = metric(page, "perplexity")
    chart = page.locator('[data-testid="stPlotlyChart"]').first
    chart.scroll_into_view_if_needed()
    click(page, chart.locator(".scatterlayer .trace").first.locator("path.point").first)  # block 0
    page.wait_for_function("before => document.querySelector('[data-testid=\"stMetricValue\"]').innerText !== before",
                           arg=before, timeout=LONG)
    idle(page)
    no_errors(page)
    after = metric(page, "perplexity")
    assert after != before
    assert "block ×1 (0)" in page.locator('[data-testid="stCaptionContainer"]', has_text="Removed:").first.inner_text()
    page.screenshot(path=str(screenshots / "3_prune.png"))

    # Search & frontier: the default greedy search, its trajectory and the frontier.
    go(page, "Search & frontier")
    page.get_by_role("button", name="Run greedy search").click()
    page.get_by_text("Trajectory").first.wait_for()
    idle(page)
    no_errors(page)
    page.screenshot(path=str(screenshots / "4_search.png"))
    frontier = page.locator('[data-testid="stPlotlyChart"]').nth(1)  # after the trajectory
    frontier.scroll_into_view_if_needed()
    click(page, frontier.locator(".scatterlayer .trace").nth(1).locator("path.point").nth(1))  # search step 2
    page.get_by_text("Loaded “step 2").first.wait_for()
    idle(page)
    no_errors(page)

    # Export: the downloaded JSON is the plan loaded from the frontier (search step 2).
    go(page, "Export")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download plan (JSON)").click()
    plan = json.loads(Path(download.value.path()).read_text())
    layers = ", ".join(str(c["layer"]) for c in plan["components"])
    assert [c["kind"] for c in plan["components"]] == ["block", "block"]
    current = page.locator('[data-testid="stMarkdownContainer"]', has_text="Current plan:").first
    assert f"block ×2 ({layers})" in current.inner_text()
    page.get_by_label("save to directory").fill(str(tmp_path / "pruned"))
    page.get_by_label("save to directory").press("Enter")
    idle(page)
    page.get_by_role("button", name="Extract and save").click()
    page.get_by_text("Saved to").first.wait_for()
    idle(page)
    no_errors(page)
    assert json.loads((tmp_path / "pruned" / "pruning_plan.json").read_text())["components"] == plan["components"]
    page.screenshot(path=str(screenshots / "5_export.png"))


def choose(page, label: str, option: str, exact: bool = True) -> None:
    """Pick ``option`` (or, not ``exact``, the first option containing it) in the selectbox labelled
    ``label``: typed into its search box, so the list is open and filtered whatever ran before."""
    box = page.get_by_role("combobox", name=label, exact=True)
    box.evaluate("e => e.scrollIntoView({block: 'center'})")  # near the viewport's edge its list is not drawn
    box.fill(option)
    options = page.get_by_role("option", name=option, exact=exact)
    (options if exact else options.first).click()
    idle(page)


def set_kinds(page, label: str, kinds: list[str]) -> None:
    """Make ``kinds`` exactly the selection of the multiselect labelled ``label``."""
    box = page.locator('[data-testid="stMultiSelect"]', has=page.get_by_role("combobox", name=label))
    while box.locator('button[aria-label^="Remove "]').count():
        box.locator('button[aria-label^="Remove "]').first.click()
        idle(page)
    for kind in kinds:
        page.get_by_role("combobox", name=label).fill(kind)
        page.get_by_role("option", name=kind, exact=True).click()
        idle(page)
    page.keyboard.press("Escape")


def small_windows(page) -> None:
    """Once the Model page has painted: load the model again with a small calibration and test set
    (2 × 64 tokens), so that searches, recovery and scores take seconds."""
    page.get_by_text("perplexity", exact=True).first.wait_for()
    idle(page)
    go(page, "Model")  # a reload opens the page it was on
    for label, value in (("windows", "2"), ("window length", "64")):
        page.get_by_role("spinbutton", name=label).fill(value)
        page.get_by_role("spinbutton", name=label).press("Enter")
        idle(page)
    page.get_by_role("button", name="Load", exact=True).click()
    idle(page)
    no_errors(page)


def test_strategies_on_one_measured_frontier_and_metric_agreement(page, screenshots):
    small_windows(page)

    # Importance: the rank-agreement matrices of the four metrics on blocks.
    go(page, "Importance")
    page.get_by_role("button", name="Compare metrics").click()
    chart = page.locator('[data-testid="stPlotlyChart"]', has=page.locator("text.gtitle", has_text="block: Spearman"))
    chart.wait_for()
    idle(page)
    no_errors(page)
    labels = [t.text_content() for t in chart.locator(".xtick text").all()]
    assert labels == ["ppl", "block_influence", "activation", "taylor"]
    page.screenshot(path=str(screenshots / "6_agreement.png"))

    # Search & frontier: block-, SSM- and mixed-greedy searches, one-shot by block influence.
    go(page, "Search & frontier")
    page.get_by_role("spinbutton", name="steps").fill("1")
    page.get_by_role("spinbutton", name="steps").press("Enter")
    idle(page)
    for kinds in (["block"], ["ssm"], ["block", "ssm"]):
        set_kinds(page, "kinds to prune", kinds)
        page.get_by_role("button", name="Run greedy search").click()
        idle(page)
    page.get_by_role("spinbutton", name="up to k").fill("1")
    page.get_by_role("spinbutton", name="up to k").press("Enter")
    idle(page)
    page.get_by_role("button", name="Add one-shot series").click()
    idle(page)
    no_errors(page)

    # Measured prefill speedup on x: measure every point, then one chart with a legend entry per strategy.
    choose(page, "x axis (cost)", "measured prefill speedup (×)")
    page.get_by_role("button", name="Measure all points (extracts and benchmarks each model)").click()
    frontier = page.locator('[data-testid="stPlotlyChart"]', has=page.locator(".xtitle", has_text="measured prefill speedup"))
    frontier.first.wait_for()
    idle(page)
    sync_api.expect(frontier).to_have_count(1, timeout=LONG)  # a rerun may briefly show the old chart beside the new
    no_errors(page)
    legend = [t.text_content() for t in frontier.locator(".legendtext").all()]
    for series in ("greedy block", "greedy ssm", "greedy block+ssm", "one-shot block_influence (block)",
                   "Pareto front (all series)"):
        assert series in legend, legend
    assert page.get_by_text("have no measured prefill speedup").count() == 0
    frontier.scroll_into_view_if_needed()
    page.screenshot(path=str(screenshots / "7_frontier.png"))


def test_runs_survive_a_model_switch_and_a_reload_recovery_exports_and_every_metric_draws(page, screenshots, tmp_path):
    """Two searches, a switch to another model and back, a browser reload restored from the Runs list,
    a recovery exported from the Export page, then the Importance page for every metric. With
    ``$SHEDDER_STUDIO_PNG`` set, the restored frontier is also written there (the README's picture)."""
    small_windows(page)
    go(page, "Search & frontier")
    page.get_by_role("spinbutton", name="steps").fill("2")
    page.get_by_role("spinbutton", name="steps").press("Enter")
    idle(page)
    for kinds in (["block"], ["ssm"]):
        set_kinds(page, "kinds to prune", kinds)
        assert page.get_by_role("spinbutton", name="steps").input_value() == "2"  # kept across kind changes
        page.get_by_role("button", name="Run greedy search").click()
        idle(page)
    no_errors(page)
    series = page.locator('[data-testid="stCaptionContainer"]', has_text="Series: ").first
    assert "greedy block" in series.inner_text() and "greedy ssm" in series.inner_text()
    page.screenshot(path=str(screenshots / "j1_search.png"))

    for model in ("hybrid-tiny", DEFAULT_MODEL):  # away and back: the searches are still there
        go(page, "Model")
        choose(page, "bundled model", model)
        page.get_by_role("button", name="Load", exact=True).click()
        page.get_by_text(f"Loaded {model}.").first.wait_for()
        idle(page)
        no_errors(page)
        page.screenshot(path=str(screenshots / f"j2_model_{model}.png"))
    go(page, "Search & frontier")
    assert "greedy block" in series.inner_text() and "greedy ssm" in series.inner_text()

    page.reload()  # a new browser session: nothing in memory, the Runs list restores the searches
    small_windows(page)  # the same text as before: the runs listed are those made on it
    go(page, "Search & frontier")
    assert "greedy" not in series.inner_text()
    page.get_by_role("button", name="Restore all").click()
    page.get_by_text("Restored ").first.wait_for()
    idle(page)
    no_errors(page)
    assert "greedy block" in series.inner_text() and "greedy ssm" in series.inner_text()
    page.screenshot(path=str(screenshots / "j3_restored.png"))
    if os.environ.get("SHEDDER_STUDIO_PNG"):
        frontier = page.locator('[data-testid="stPlotlyChart"]', has=page.locator(".xtitle")).last
        frontier.scroll_into_view_if_needed()
        frontier.screenshot(path=os.environ["SHEDDER_STUDIO_PNG"])

    # Recover the first block-search step and export the recovered model.
    choose(page, "load a configuration into the Prune page", "step 1", exact=False)
    page.get_by_role("button", name="Load", exact=True).click()
    page.get_by_text("Loaded “step 1").first.wait_for()
    go(page, "Recover")
    page.get_by_role("spinbutton", name="steps").fill("10")
    page.get_by_role("spinbutton", name="steps").press("Enter")
    idle(page)
    page.get_by_role("button", name="Recover", exact=True).click()
    page.get_by_text("the Export page exports it").first.wait_for()
    idle(page)
    no_errors(page)
    page.screenshot(path=str(screenshots / "j4_recover.png"))
    go(page, "Export")
    page.locator('[data-testid="stRadio"] label').filter(has_text=" of: ").first.click()
    idle(page)
    page.get_by_label("save to directory").fill(str(tmp_path / "recovered"))
    page.get_by_label("save to directory").press("Enter")
    idle(page)
    page.get_by_role("button", name="Save", exact=True).click()
    page.get_by_text("Saved to").first.wait_for()
    idle(page)
    no_errors(page)
    assert {"config.json", "model.safetensors", "recovery.json"} <= {p.name for p in (tmp_path / "recovered").iterdir()}
    page.screenshot(path=str(screenshots / "j5_export_recovered.png"))

    go(page, "Importance")
    for name, m in REGISTRY.items():
        if name != "ppl":
            choose(page, "metric", f"{name} — {m.description}")
        page.get_by_role("button", name="Compute importance").click()
        page.get_by_text("All scores").wait_for()
        idle(page)
        no_errors(page)
        page.screenshot(path=str(screenshots / f"j6_importance_{name}.png"))
