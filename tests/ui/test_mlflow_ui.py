"""What a person sees in the MLflow UI after a study (`make ui-check`): headless Chromium,
driven by selenium, on a fresh server holding the tiny study. Screenshots of every page it
checks are kept in $PRUNELAB_UI_CHECK_DIR (default reports/ui-check).

Deselected from `make test`; `make ui-check` runs it (pytest -m ui).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from prunelab import paths
from prunelab.tracking import query

pytestmark = pytest.mark.ui

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Every cell of the grid on screen, merged per row (ag-grid splits a row between its pinned
# and scrolling parts, and renders only the columns in view).
ROWS_JS = """
const rows = arguments[0] || {};
document.querySelectorAll('[role=row][row-index]').forEach(r => {
  const i = r.getAttribute('row-index');
  rows[i] = rows[i] || {};
  r.querySelectorAll('[role=gridcell][col-id]').forEach(c => {
    const text = c.innerText.trim();
    if (text) rows[i][c.getAttribute('col-id').replaceAll('&quot;', '"')] = text;
  });
});
return rows;"""
SCROLLERS = "Array.from(document.querySelectorAll('.ag-body-horizontal-scroll-viewport, .ag-center-cols-viewport'))"
# ag-grid also renders only the rows near the view: the grid is scrolled down through them.
VERTICAL = "Array.from(document.querySelectorAll('.ag-body-viewport, .ag-body-vertical-scroll-viewport'))"


@pytest.fixture(scope="module")
def shots() -> Path:
    folder = Path(os.environ.get("PRUNELAB_UI_CHECK_DIR", "reports/ui-check"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.fail(f"no {CHROMIUM} / {CHROMEDRIVER}: install Debian's chromium and chromium-driver (`make ui-check` does, as root)")
    profile = tempfile.mkdtemp(prefix="ui-check-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1600,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(driver, timeout: float = 30):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25, ignored_exceptions=(StaleElementReferenceException,))


def grid(driver) -> dict[str, dict[str, str]]:
    """Row index -> {column id: text} of the whole grid, scrolled through from top to bottom
    and, at each height, from left to right."""
    rows = driver.execute_script(ROWS_JS, {})
    height, tall = driver.execute_script(f"const v = {VERTICAL}; return v.length ? [v[0].scrollHeight, v[0].clientHeight] : [0, 1]")
    width, view = driver.execute_script(f"const v = {SCROLLERS}; return v.length ? [v[0].scrollWidth, v[0].clientWidth] : [0, 1]")
    for top in range(0, height + tall, max(tall // 2, 100)):
        driver.execute_script(f"{VERTICAL}.forEach(v => v.scrollTop = arguments[0])", top)
        for left in range(0, width + view, max(view // 2, 100)):
            driver.execute_script(f"{SCROLLERS}.forEach(v => v.scrollLeft = arguments[0])", left)
            rows = driver.execute_script(ROWS_JS, rows)
    driver.execute_script(f"{SCROLLERS}.forEach(v => v.scrollLeft = 0); {VERTICAL}.forEach(v => v.scrollTop = 0)")
    return rows


def reveal(driver, col_id: str) -> None:
    """Scroll the grid so that column `col_id` is in view (for the screenshot)."""
    left_of = ("const c = Array.from(document.querySelectorAll('[role=gridcell][col-id]'))"
               ".find(e => e.getAttribute('col-id').replaceAll('&quot;', '\"') === arguments[0]);"
               "return c ? parseInt(c.style.left || '0') : null")
    width, view = driver.execute_script(f"const v = {SCROLLERS}; return v.length ? [v[0].scrollWidth, v[0].clientWidth] : [0, 1]")
    for left in range(0, width + view, max(view // 2, 100)):
        driver.execute_script(f"{SCROLLERS}.forEach(v => v.scrollLeft = arguments[0])", left)
        x = driver.execute_script(left_of, col_id)
        if x is not None:
            driver.execute_script(f"{SCROLLERS}.forEach(v => v.scrollLeft = arguments[0])", max(0, x - view // 2))
            return


def close_assistant(driver) -> None:
    """Close the assistant panel the UI opens on a first visit (it hides a third of the page)."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()


def name(text: str) -> str:
    return text.splitlines()[-1] if text else ""  # a run's or model's name follows its colour chip


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_the_study_link_opens_on_its_runs_with_test_accuracy(tiny_study, client, tracking_uri, browser, shots):
    """The link prunelab prints opens the experiment on its runs (not on GenAI traces); the
    trials' runs, once the main run is expanded and test_accuracy is chosen as a column,
    show the accuracy each fine-tuning run logged."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC

    link = query.runs_url(tiny_study["experiment_id"], tracking_uri)
    assert link in tiny_study["stdout"]
    browser.get(link)
    wait(browser).until(lambda d: "main" in {name(r.get("attributes.`Run Name`", "")) for r in grid(d).values()})
    assert "/runs" in browser.current_url and "genai" not in browser.current_url
    close_assistant(browser)
    browser.save_screenshot(str(shots / "1-runs-collapsed.png"))
    # Expand the main run (its trials' steps are its children), then add the metric column.
    for expander in browser.find_elements(By.CSS_SELECTOR, "[col-id='attributes.`Run Name`'] button"):
        expander.click()
    steps = {f"{stage}-t{t}" for stage in ("train", "prune", "finetune") for t in (0, 1)}
    wait(browser).until(lambda d: steps <= {name(r.get("attributes.`Run Name`", "")) for r in grid(d).values()})
    browser.find_element(By.XPATH, "//button[normalize-space()='Columns']").click()
    wait(browser).until(EC.element_to_be_clickable(
        (By.XPATH, "//*[normalize-space(text())='test_accuracy' and not(ancestor::*[@role='grid'])]"))).click()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)

    def accuracy_by_run(d):
        rows = grid(d).values()
        shown = {name(r.get("attributes.`Run Name`", "")): r.get("metrics.`test_accuracy`") for r in rows}
        return shown if all(shown.get(s) not in (None, "-") for s in steps) else False

    shown = wait(browser).until(accuracy_by_run)
    reveal(browser, "metrics.`test_accuracy`")
    browser.save_screenshot(str(shots / "2-runs-test-accuracy.png"))
    for trial in (0, 1):
        run = tiny_study["by_stage"][("finetune", trial)]
        assert number(shown[f"finetune-t{trial}"]) == pytest.approx(run.data.metrics["test_accuracy"], abs=5e-4)
    assert shown["main"] in (None, "-")  # the parent run holds no accuracy of its own


def test_the_result_link_opens_main_with_the_study_result(tiny_study, client, tracking_uri, browser, shots):
    """The first link prunelab prints opens the `main` run, which shows the study's result
    without a click: the report's table in its description, its headline metrics with the
    values the report run logged, and the figures among its artifacts."""
    from selenium.webdriver.common.by import By

    main = next(r for r in tiny_study["runs"] if r.data.tags.get("stage") == "main")
    report = next(r for r in tiny_study["runs"] if r.data.tags.get("stage") == "report")
    link = query.run_url(tiny_study["experiment_id"], main.info.run_id, tracking_uri)
    assert f"the study's result in the MLflow UI: {link}" in tiny_study["stdout"]
    headline = "pruned_fine-tuned.test_accuracy_mean"
    assert main.data.metrics[headline] == report.data.metrics[headline]  # what the server holds
    browser.get(link)
    body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
    wait(browser).until(lambda d: "pruned + fine-tuned" in body(d) and headline in body(d))
    close_assistant(browser)
    assert "genai" not in browser.current_url
    browser.save_screenshot(str(shots / "0-study-result.png"))
    # The UI shows a metric's value rounded; the digits it shows are the report's.
    shown = f"{report.data.metrics[headline]:.3f}"[:-1]
    assert shown in body(browser), f"{headline} {shown} not on the page"
    browser.get(link.replace("?", "/artifacts/figures?", 1))
    wait(browser).until(lambda d: "test_accuracy.png" in body(d))
    browser.save_screenshot(str(shots / "0-study-figures.png"))


def test_models_page_lists_the_pruned_model_with_its_real_size(tiny_study, client, tracking_uri, browser, shots):
    """The Models page shows each trial's pruned model with the parameter count its run logged
    last (not the unpruned count), and the trained model with the unpruned one."""
    prune = tiny_study["by_stage"][("prune", 0)]
    pruned_params = prune.data.metrics["params"]
    assert pruned_params < 126_698
    browser.get(query.runs_url(tiny_study["experiment_id"], tracking_uri).replace("/runs?", "/models?"))
    params_col = 'metrics.{"metricKey":"params"}'

    wanted = {(f"{stage}-t{t}", "model") for stage in ("train", "prune", "finetune") for t in (0, 1)}

    def models(d):
        rows = [r for r in grid(d).values() if r.get("name")]
        shown = {(r.get("source_run_id"), name(r["name"])) for r in rows if params_col in r}
        return rows if wanted <= shown else False

    rows = wait(browser).until(models)
    reveal(browser, params_col)
    browser.save_screenshot(str(shots / "3-models.png"))
    by_source = {(r.get("source_run_id"), name(r["name"])): number(r[params_col]) for r in rows if params_col in r}
    assert by_source[("prune-t0", "model")] == pruned_params
    assert by_source[("finetune-t0", "model")] == pruned_params
    assert by_source[("train-t0", "model")] == 126_698
    rounds = {k: v for k, v in by_source.items() if k[0] == "prune-t0" and k[1].startswith("model_round_")}
    assert rounds and all(pruned_params < v < 126_698 for v in rounds.values())  # each round its own size


def test_a_model_page_and_the_registered_champion(tiny_study, client, tracking_uri, browser, shots):
    """The fine-tuned model's own page lists its metrics; the registry page shows the champion alias."""
    from selenium.webdriver.common.by import By

    finetune = tiny_study["by_stage"][("finetune", 0)]
    model_id = finetune.data.tags[paths.TAG_MODEL_URI].removeprefix("models:/")
    browser.get(f"{tracking_uri}/#/experiments/{tiny_study['experiment_id']}/models/{model_id}?workflowType=machine_learning")
    accuracy = f"{finetune.data.metrics['test_accuracy']}"
    body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
    wait(browser).until(lambda d: "test_accuracy" in body(d) and accuracy in body(d) and "fraction_remaining" in body(d))
    browser.save_screenshot(str(shots / "4-fine-tuned-model.png"))
    browser.get(f"{tracking_uri}/#/models/{tiny_study['study']}")
    wait(browser).until(lambda d: paths.CHAMPION in body(d) and "Version 2" in body(d))
    browser.save_screenshot(str(shots / "5-registered-model.png"))


# A criteria comparison at test scale: five criteria x four compression ratios, one trial.
COMPARISON = "test-ui-comparison"
COMPARISON_OVERRIDES = ("data.n_train=256 data.n_test=200 train.epochs=1 finetune.epochs=1 prune.rank_images=128 "
                        f"prune.latency_repeats=0 trials=1 study={COMPARISON}")


@pytest.fixture(scope="module")
def tiny_comparison(tracking_uri, client, fashion_dir):
    import subprocess
    import sys

    from conftest import REPO, clean_env

    proc = subprocess.run([sys.executable, "-m", "prunelab", "run", "--study", "compare-cnn-fashionmnist",
                           "--overrides", COMPARISON_OVERRIDES], capture_output=True, text=True,
                          env=clean_env(tracking_uri), timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = client.get_experiment_by_name(COMPARISON)
    finetuned = client.search_runs([exp.experiment_id], "tags.stage = 'finetune'")
    return {"experiment_id": exp.experiment_id, "finetuned": finetuned}


def choose(driver, axis: int, value: str, timeout: float = 60) -> None:
    """Choose `value` in the `axis`-th select of the open dialog, as a person does with the
    keyboard: open the list with a real click on the select's box (its input lies under it),
    type the name, then go down the filtered list until the highlighted option is exactly
    `value` (the list draws only the options in view, and `test_accuracy` follows the
    `ratio_<k>.<method>.test_accuracy_<stat>` of `main`), and take it with Enter. While the
    dialog is still loading the run's metrics and params the option is not there yet: the
    list is closed and opened again until it is, for at most `timeout` seconds (the select is
    looked up afresh each time: the dialog redraws it once they have loaded)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    label_of = "const e = document.getElementById(arguments[0]); return e && e.getAttribute('aria-label')"

    def select(d):
        inputs = [i for i in d.find_elements(By.CSS_SELECTOR, "[role=dialog] input[role=combobox]") if i.is_displayed()]
        return inputs[axis], inputs[axis].find_element(By.XPATH, "./ancestor::*[contains(@class, 'select-selector')][1]")

    def chosen(d):
        axis, box = select(d)
        if axis.get_attribute("aria-expanded") != "true":
            ActionChains(d).move_to_element(box).click().perform()
            return False  # opening: looked at on the next try
        axis.send_keys(Keys.CONTROL, "a")
        axis.send_keys(value)
        first = None
        for _ in range(500):  # the list is circular: once round it is enough
            active = axis.get_attribute("aria-activedescendant")
            label = d.execute_script(label_of, active) if active else None
            if label == value:
                axis.send_keys(Keys.ENTER)
                return True
            if label is None or label == first:
                break
            first = first or label
            axis.send_keys(Keys.ARROW_DOWN)
        axis.send_keys(Keys.ESCAPE)  # not (yet) in the list: close it and try again
        return False

    wait(driver, timeout).until(chosen)
    wait(driver).until(lambda d: select(d)[1].text.strip() == value)


def test_the_chart_view_plots_accuracy_against_ratio_by_method(tiny_comparison, tracking_uri, browser, shots):
    """docs/tracking.md's recipe: the fine-tuning runs of a comparison, all shown, in the chart
    view; a scatter chart of test_accuracy against the param compare.ratio has one point per
    method and ratio, each run's own, at the ratio and accuracy that run logged."""
    import time

    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC

    finetuned = tiny_comparison["finetuned"]
    assert len({(r.data.params["prune.method"], r.data.params["compare.ratio"]) for r in finetuned}) == 20
    browser.get(query.runs_url(tiny_comparison["experiment_id"], tracking_uri) + "&compareRunsMode=CHART")
    search = wait(browser).until(lambda d: d.find_element(By.CSS_SELECTOR, "input[data-testid=search-box]"))
    close_assistant(browser)
    search.send_keys("attributes.run_name LIKE 'finetune-%'", Keys.ENTER)
    # The search takes a while on a busy machine: the count (the 20 runs and their parent, main) says when it has answered.
    wait(browser, 120).until(lambda d: re.search(r"\b21 matching runs", d.find_element(By.TAG_NAME, "body").text))

    # Expand `main`: the steps are its children (the chart view's table is the narrow one).
    # A click while the grid still redraws may be lost: clicked again after a pause, never twice at once.
    finetune_rows = "//*[@role='gridcell']//*[starts-with(normalize-space(.), 'finetune-')]"
    clicked = [0.0]

    def expanded(d):
        if d.find_elements(By.XPATH, finetune_rows):
            return True
        buttons = d.find_elements(By.CSS_SELECTOR, "[role=gridcell] button")
        if buttons and time.monotonic() - clicked[0] > 5:
            buttons[0].click()  # stale while the grid redraws: `wait` tries again
            clicked[0] = time.monotonic()
        return False

    wait(browser, 60).until(expanded)
    # The chart view draws the first 10 runs unless told otherwise.
    browser.find_element(By.CSS_SELECTOR, "[data-testid=experiment-view-runs-visibility-column-header]").click()
    wait(browser).until(EC.element_to_be_clickable((By.XPATH, "//*[@role='menuitemradio'][normalize-space()='Show all runs']"))).click()
    browser.find_element(By.CSS_SELECTOR, "[data-testid=experiment-view-compare-runs-add-chart]").click()
    wait(browser).until(lambda d: d.find_element(By.CSS_SELECTOR, "[data-testid=experiment-view-compare-runs-chart-type-scatter]")).click()
    # Its selects, once drawn: the X axis, then the Y axis.
    wait(browser).until(lambda d: len([i for i in d.find_elements(By.CSS_SELECTOR, "[role=dialog] input[role=combobox]")
                                       if i.is_displayed()]) == 2)
    choose(browser, 0, "compare.ratio")
    choose(browser, 1, "test_accuracy")
    browser.find_element(By.CSS_SELECTOR, "[data-testid=experiment-view-compare-runs-chart-modal-confirm]").click()
    wait(browser).until(lambda d: not [e for e in d.find_elements(By.CSS_SELECTOR, "[role=dialog]") if e.is_displayed()])

    # The view draws only the charts scrolled into view, and the new one follows the 150-odd charts
    # of the metrics: *Search metric charts* for the param leaves it alone on top. Its points carry
    # their run's name.
    charts_search = browser.find_element(By.CSS_SELECTOR, "[data-testid=experiment-view-compare-runs-chart-area] "
                                                          "input[placeholder='Search metric charts']")
    charts_search.send_keys("compare.ratio")
    plotted = """
return Array.from(document.querySelectorAll('[data-testid=experiment-view-compare-runs-chart-area] .js-plotly-plot'))
  .filter(p => p.layout && p.layout.xaxis && ((p.layout.xaxis.title || {}).text || '').includes('compare.ratio'))
  .flatMap(p => p.data.flatMap(t => (t.x || []).map((x, i) => [(t.customdata || [])[i], x, t.y[i]])));"""
    logged = {r.info.run_name: (float(r.data.params["compare.ratio"]), r.data.metrics["test_accuracy"]) for r in finetuned}

    found = []

    def points(d):
        found[:] = d.execute_script(plotted) or []
        return list(found) if len(found) >= len(logged) else False

    try:
        points = wait(browser, 60).until(points)
    except TimeoutException:
        browser.save_screenshot(str(shots / "6-comparison-chart.png"))
        pytest.fail(f"the chart plots {len(found)} points, not one for each of the {len(logged)} runs: {found}")
    browser.save_screenshot(str(shots / "6-comparison-chart.png"))
    shown = {run[1]: (float(x), float(y)) for run, x, y in points}  # a point's run: [its id, its name]
    assert len(points) == len(logged) and shown.keys() == logged.keys()
    for run, (ratio, accuracy) in logged.items():
        assert shown[run] == pytest.approx((ratio, accuracy)), run
