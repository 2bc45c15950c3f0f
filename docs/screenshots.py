"""The MLflow UI in headless Chromium: the README's screenshots and the browser test's driver.

    python docs/screenshots.py        # the store ./mlflow.db -> docs/images/mlflow_*.png

Starts `mlflow ui` on a free 127.0.0.1 port, opens the experiment's runs page in its chart view
and its runs table in Debian's Chromium (`apt-get install chromium
chromium-driver`) through selenium, and saves each page as a PNG. Nothing is downloaded: the
browser and its driver are the system's, and Chromium's background networking is switched off.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EXPERIMENT = "convnet-pipeline"


def have_chromium() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(
    store_uri: str, timeout: float = 120, options: Sequence[str] = (), env: dict | None = None
) -> Iterator[str]:
    """`mlflow ui` on the store, on 127.0.0.1 (with more server `options`, in `env`); yields
    its address. Its workers are stopped with it (the whole process group)."""
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    # Its log goes to a file: it logs every request, and a pipe nobody reads would fill up
    # and stall the server.
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [str(mlflow), "ui", "--backend-store-uri", store_uri, "--host", "127.0.0.1",
             "--port", str(port), *options],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        said = log.read().decode(errors="replace")[-2000:]
                        raise RuntimeError(f"mlflow ui did not start on {url}:\n{said}") from None
                    time.sleep(0.5)
            yield url
        finally:
            stop_group(server)


def stop_group(process: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
    """Stop `process`, started with start_new_session=True, and every process of its group:
    `signum`, up to 30 s for the leader to exit, then SIGKILL for whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # workers that outlived the leader
    process.wait()


@contextlib.contextmanager
def chromium(width: int = 1600, height: int = 1200) -> Iterator:
    """A selenium driver for headless Debian Chromium with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--window-size={width},{height}"]  # fmt: skip
    for flag in flags:
        options.add_argument(flag)
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"chromium-profile-{os.getpid()}"
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for_lines(driver, lines: list[str], timeout: float = 60) -> list[str]:
    """The page's visible text, line by line, once each of `lines` is one of them (a chart
    title, a run name; not a word inside a sentence), else TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        shown = driver.find_element("tag name", "body").text.splitlines()
        missing = [line for line in lines if line not in shown]
        if not missing:
            return shown
        if time.monotonic() > deadline:
            raise TimeoutError(f"page never showed {missing}; it shows:\n{shown[:200]}")
        time.sleep(0.5)


def runs_table(driver, url: str, experiment_id: str) -> None:
    """The experiment's runs as a table (name, dataset, start time, ...)."""
    driver.get(f"{url}/#/experiments/{experiment_id}/runs")


def chart_view(driver, url: str, experiment_id: str, search: str = "") -> None:
    """The experiment's runs in the chart view: one chart per metric, one line/bar per run;
    `search` keeps the charts whose metric names contain it (e.g. "top1")."""
    driver.get(f"{url}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART")
    wait_for_lines(driver, ["Model metrics"])
    close = driver.find_elements("css selector", "button[aria-label=Close]")
    if close and close[0].is_displayed():  # the assistant panel that opens on a first visit
        close[0].click()
    if search:
        box = driver.find_element("css selector", "input[placeholder='Search metric charts']")
        box.send_keys(search)


def main(store: str = "sqlite:///mlflow.db", out: Path = Path("docs/images")) -> None:
    import mlflow

    mlflow.set_tracking_uri(store)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"error: no {EXPERIMENT} experiment in {store}; run `dvc repro` first")
    runs = mlflow.search_runs(
        [experiment.experiment_id], "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=2, output_format="list",
    )  # fmt: skip
    names = [r.info.run_name for r in runs]
    with mlflow_ui(store) as url, chromium() as driver:
        chart_view(driver, url, experiment.experiment_id, search="top1")
        wait_for_lines(driver, ["val_top1", "ten_crop_top1", *names])
        time.sleep(3)  # let the charts finish drawing
        driver.save_screenshot(str(out / "mlflow_charts.png"))
        runs_table(driver, url, experiment.experiment_id)
        wait_for_lines(driver, ["Dataset", *names])
        time.sleep(2)
        driver.save_screenshot(str(out / "mlflow_runs.png"))
    print(f"wrote {out / 'mlflow_charts.png'} and {out / 'mlflow_runs.png'} ({', '.join(names)})")


if __name__ == "__main__":
    main(*sys.argv[1:2])
