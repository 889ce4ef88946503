"""The Dagster UI as a person sees it: ``dagster-webserver`` on 127.0.0.1,
driven by Debian's headless ``chromium`` through selenium.

One state for the module, made by ``voiceman run`` on two short samples and
one file that is not audio (``broken.wav``): the recordings' partitions of
``report`` are materialized and the broken one's failed. One webserver and one
browser serve every test here. Each step saves a screenshot under
``$VOICEMAN_TEST_ARTIFACTS/browser/`` (default ``data/test-artifacts/browser/``)
for a person to look at.

Without chromium, chromedriver or selenium the tests skip, except under
``CI=true``, where they fail: CI must not silently skip them.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from dagster import DagsterInstance

from voiceman_pipeline_tests.conftest import (
    REPO, SAMPLES, free_port, location_loaded, shipped_storage_yaml, wait_for,
)

STAGES = ["audio", "transcript", "forensic", "emotion", "report"]
BIN = Path(sys.executable).parent
GOOD = ["cards_001.wav", "cards_002.wav"]  # the two shortest samples (1.1 s, 2.0 s)
BROKEN = "broken.wav"
PNG_DATA_URI = "data:image/png;base64,"
UI_WAIT_S = 60  # how long a page may take to show something, on a busy machine
ARTIFACTS = Path(os.environ.get("VOICEMAN_TEST_ARTIFACTS") or REPO / "data" / "test-artifacts") / "browser"

pytestmark = pytest.mark.timeout(300)


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must run the browser tests", pytrace=False)
    pytest.skip(reason)


def _program(name: str) -> str | None:
    preferred = Path("/usr/bin") / name  # Debian's packages
    return str(preferred) if preferred.is_file() else shutil.which(name)


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver; checked before any state is made for them."""
    if importlib.util.find_spec("selenium") is None:
        _unavailable("selenium is not installed (pip install -e '.[dev]')")
    chromium, driver_path = _program("chromium"), _program("chromedriver")
    if not (chromium and driver_path):
        _unavailable("chromium or chromedriver not found (Debian: apt-get install chromium chromium-driver)")
    return chromium, driver_path


@pytest.fixture(scope="module")
def browser(chromium):
    """Headless chromium at a fixed window size (screenshots are comparable run to run)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1600,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


class UI(NamedTuple):
    url: str  # the webserver's base URL
    data: Path  # VOICEMAN_DATA_DIR of the runs it shows
    home: Path  # DAGSTER_HOME of the runs it shows


@pytest.fixture(scope="module")
def ui(tmp_path_factory, chromium) -> UI:
    """``dagster-webserver`` over a home that ``voiceman run`` filled."""
    root = tmp_path_factory.mktemp("browser")
    home, data = root / "home", root / "data"
    home.mkdir()
    (data / "inbox").mkdir(parents=True)
    (home / "dagster.yaml").write_text(shipped_storage_yaml(home))
    for name in GOOD:
        shutil.copyfile(SAMPLES / name, data / "inbox" / name)
    (data / "inbox" / BROKEN).write_text("not a recording\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "VOICEMAN_DATA_DIR": str(data),
           "PYTHONPATH": str(REPO), "VOICEMAN_WORKERS": "1"}  # one run: the pages below show it
    env.pop("VOICEMAN_PG_URL", None)  # this home's storage is sqlite, whatever the shell says
    with DagsterInstance.from_config(str(home)):
        pass  # creates the storage's databases here, so the two processes below need not race to
    port = free_port()
    log = open(root / "webserver.log", "w")
    # Started first: it loads the code location while `voiceman run` computes;
    # it reads Dagster's storage per request, so it shows what the run wrote.
    server = subprocess.Popen(
        [BIN / "dagster-webserver", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # -v: Dagster's console lines too, which the run's stderr capture keeps for the UI.
        made = subprocess.run([BIN / "voiceman", "-v", "run", "--settle", "0.2"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        rows = {words[0]: line for line in made.stdout.splitlines()
                if (words := line.split()) and words[0] in GOOD + [BROKEN]}  # its status table
        assert made.returncode == 1, made.stdout + made.stderr  # exit 1: a recording failed
        assert "failed at audio" in rows.get(BROKEN, ""), made.stdout + made.stderr
        assert all(" done " in rows.get(name, "") for name in GOOD), made.stdout + made.stderr
        wait_for(lambda: location_loaded(f"{url}/graphql"), 120, "the webserver to load the code location")
        yield UI(url, data, home)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
        log.close()



def _until(driver, condition, what: str):
    """``condition(driver)``'s first truthy value, waiting up to UI_WAIT_S."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, UI_WAIT_S, ignored_exceptions=(StaleElementReferenceException,)).until(
            condition)
    except TimeoutException:
        _screenshot(driver, f"timeout-{what.replace(' ', '-')[:40]}")
        raise AssertionError(f"the UI did not show {what} within {UI_WAIT_S} s") from None


def _screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _open(driver, url: str) -> None:
    """Load ``url`` without Dagster's first-visit "Join the community" dialog over it."""
    driver.get(url)
    # The dialog remembers being dismissed in localStorage: set that once for the origin.
    if driver.execute_script("return window.localStorage.getItem('communityNux')") is None:
        driver.execute_script("window.localStorage.setItem('communityNux', '\"1\"')")
        driver.get(url)


def _visible_graph_nodes(driver) -> dict[str, tuple[dict, str]]:
    """Asset names drawn as nodes of the lineage graph (SVG foreignObjects): each
    name's box on screen and the node's inline style (its status colours)."""
    from selenium.webdriver.common.by import By

    nodes = {}
    for element in driver.find_elements(
        By.XPATH, "//*[local-name()='svg']//*[local-name()='foreignObject']//div[text()]"
    ):
        name = element.text.strip()
        if name in STAGES and element.is_displayed() and element.size["width"] > 0:
            box = element.find_elements(By.XPATH, "ancestor::div[contains(@style, '--minimal-border')][1]")
            nodes[name] = (element.rect, box[0].get_attribute("style") if box else "")
    return nodes


def _partition_list(driver) -> list[str]:
    """Partition keys listed in the left column of the asset's Partitions tab."""
    from selenium.webdriver.common.by import By

    column = "//input[@placeholder='Filter by name…']/ancestor::div[.//div[@title]][1]"
    return [e.get_attribute("title") for e in driver.find_elements(By.XPATH, column + "//div[@title][span]")]


def _show_only(driver, status: str) -> None:
    """Tick only ``status`` among the Partitions tab's status filters (Failed, Materialized, ...)."""
    from selenium.webdriver.common.by import By

    labels = driver.find_elements(By.XPATH, "//label[input[@type='checkbox']]")
    assert any(label.text.startswith(f"{status} (") for label in labels), [label.text for label in labels]
    for label in labels:
        if label.find_element(By.TAG_NAME, "input").is_selected() != label.text.startswith(f"{status} ("):
            label.click()


def test_the_asset_graph_shows_the_chain(ui, browser):
    _open(browser, f"{ui.url}/asset-groups")
    # Each stage is drawn in red once its statuses have loaded: broken.wav failed
    # at every stage (at audio, and "not run" after it).
    nodes = _until(browser, lambda d: (n := _visible_graph_nodes(d)).keys() >= set(STAGES) and all(
        "--minimal-border: var(--color-accent-red)" in n[name][1] for name in STAGES) and n,
        "the five stages in the asset graph, drawn as failed")
    _screenshot(browser, "1-asset-graph")
    # Drawn left to right in the order the chain runs; forensic and emotion both read the transcript.
    x = {name: nodes[name][0]["x"] for name in STAGES}
    assert x["audio"] < x["transcript"] < min(x["forensic"], x["emotion"]) <= max(
        x["forensic"], x["emotion"]) < x["report"]


def test_report_partitions_show_the_failed_and_the_materialized(ui, browser):
    from selenium.webdriver.common.by import By

    _open(browser, f"{ui.url}/assets/report?view=partitions")
    _until(browser, lambda d: sorted(_partition_list(d)) == sorted(GOOD + [BROKEN]),
           "the three partitions of report")
    _screenshot(browser, "2-report-partitions")

    _show_only(browser, "Failed")
    _until(browser, lambda d: _partition_list(d) == [BROKEN], "only broken.wav under Failed")
    browser.find_element(By.XPATH, f"//div[@title='{BROKEN}']").click()
    _until(browser, lambda d: "failed, and did not materialize this asset" in d.find_element(
        By.TAG_NAME, "body").text, "why broken.wav has no report")
    _screenshot(browser, "3-report-failed-partition")

    _show_only(browser, "Materialized")
    _until(browser, lambda d: _partition_list(d) == GOOD, "only the good recordings under Materialized")
    browser.find_element(By.XPATH, f"//div[@title='{GOOD[1]}']").click()
    # The selected partition's heading: its key and a "Materialized" tag.
    _until(browser, lambda d: d.find_elements(
        By.XPATH, f"//div[@data-tooltip='{GOOD[1]}'][.//span[normalize-space(text())='Materialized']]"),
        f"{GOOD[1]} tagged Materialized")
    _screenshot(browser, "4-report-materialized-partition")


def test_a_materialized_report_shows_its_plot(ui, browser):
    from selenium.webdriver.common.by import By

    key = GOOD[0]
    _open(browser, f"{ui.url}/assets/report?view=partitions")
    _until(browser, lambda d: key in _partition_list(d), f"{key} in the partition list")
    browser.find_element(By.XPATH, f"//div[@title='{key}']").click()
    # The partition's metadata table; its `plot` row opens the markdown in a dialog.
    show = _until(browser, lambda d: d.find_elements(
        By.XPATH, "//tr[td[1][normalize-space()='plot']]//a[normalize-space()='[Show Markdown]']"),
        f"the plot entry of {key}'s report")
    _screenshot(browser, "5-report-partition-metadata")
    show[0].click()
    image = _until(browser, lambda d: [
        img for img in d.find_elements(By.CSS_SELECTOR, ".bp5-dialog img")
        if (img.get_attribute("src") or "").startswith(PNG_DATA_URI)
        and browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
    ], f"{key}'s plot in the dialog")[0]
    _screenshot(browser, "6-report-plot")
    width, height = browser.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert width > 0 and height > 0 and image.is_displayed()
    # The picture shown is the recording's plot file, byte for byte.
    shown = base64.b64decode(image.get_attribute("src")[len(PNG_DATA_URI):])
    assert shown == (ui.data / "outputs" / key / "report.png").read_bytes()


def test_a_run_s_page_shows_what_the_run_wrote_to_stderr(ui, browser):
    """The run's raw stderr (compute_logs.py captured it) as its page shows it."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    with DagsterInstance.from_config(str(ui.home)) as instance:
        (run,) = [r for r in instance.get_runs() if r.job_name == "analysis_job"]
    _open(browser, f"{ui.url}/runs/{run.run_id}?logType=stderr")
    picker = "//input[starts-with(@placeholder, 'Select a step')]"
    step = ("//*[(@role='option' or @role='menuitem' or contains(@class, 'menu-item'))"
            " and normalize-space()='recording_analysis']")

    def step_listed(driver):
        # A click before the page has loaded the run's steps opens no list (seen
        # once in CI on a busy machine): click the picker again until it lists it.
        if not driver.find_elements(By.XPATH, step):
            try:
                driver.find_element(By.XPATH, picker).click()
            except WebDriverException:  # covered or re-rendered meanwhile: next time
                pass
            time.sleep(1.0)
        return driver.find_elements(By.XPATH, step)

    _until(browser, lambda d: d.find_elements(By.XPATH, picker), "the step picker of the stderr tab")
    _until(browser, step_listed, "the analysis step to pick")[0].click()
    # Lines Dagster's console logger wrote during the step: why broken.wav
    # failed, and the run's batch report.
    def stderr_shown(driver) -> str | None:
        text = driver.find_element(By.TAG_NAME, "body").text
        return text if f"Batch report, run {run.run_id[:8]}" in text else None

    shown = _until(browser, stderr_shown, "the run's stderr")
    _screenshot(browser, "7-run-stderr")
    assert f"audio failed for {BROKEN}" in shown
    (err,) = (ui.home / "compute_logs" / run.run_id / "compute_logs").glob("*.err")
    assert f"audio failed for {BROKEN}" in err.read_text()
