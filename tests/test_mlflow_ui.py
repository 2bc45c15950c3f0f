"""The MLflow UI as a user sees it, in headless Chromium: two trained and evaluated runs, told
apart by name, each with its curves in the chart view and its dataset in the runs table.

Skipped where Debian's chromium and chromium-driver are not installed (`.ci/run` installs them).
"""

import sys
from pathlib import Path

import mlflow
import pytest
from helpers.fabricate import make_processed, write_params

from stages import evaluate, params, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs"))
import screenshots  # noqa: E402  (docs/screenshots.py: the README's screenshots use it too)

pytest.importorskip("selenium")
pytestmark = pytest.mark.skipif(
    not screenshots.have_chromium(), reason="needs /usr/bin/chromium and /usr/bin/chromedriver"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow store holding two finished runs: mlp (as `dvc repro` names it) and logreg
    (as a `dvc exp run` named quiet-fern does), each trained 2 epochs and evaluated."""
    root = tmp_path_factory.mktemp("ui")
    make_processed(root)
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("DVC_EXP_NAME", raising=False)
        for model, exp_name in (("mlp", None), ("logreg", "quiet-fern")):
            if exp_name:
                mp.setenv("DVC_EXP_NAME", exp_name)
            p = params.load(write_params(root, model))
            train.train(p)
            evaluate.evaluate(p)
    mlflow.set_tracking_uri(uri)
    return uri, mlflow.get_experiment_by_name("convnet-pipeline").experiment_id


@pytest.mark.slow
def test_chart_view_shows_both_runs_curves_and_10_crop_results(store, tmp_path):
    uri, experiment_id = store
    with screenshots.mlflow_ui(uri) as url, screenshots.chromium() as driver:
        screenshots.chart_view(driver, url, experiment_id, search="top1")
        # Whole lines: chart titles and the run list's names, not words of the description.
        shown = screenshots.wait_for_lines(
            driver, ["val_top1", "ten_crop_top1", "digits/mlp", "digits/logreg/quiet-fern"]
        )
        driver.save_screenshot(str(tmp_path / "charts.png"))

        screenshots.runs_table(driver, url, experiment_id)
        shown = screenshots.wait_for_lines(
            driver, ["Dataset", "digits/mlp", "digits/logreg/quiet-fern", "digits-mlp"]
        )
        datasets = [line for line in shown if line.startswith("digits (")]
        assert len(datasets) == 2, shown  # each run's dataset input, with its digest
        assert "digits-logreg" in shown  # the logged models, named after dataset and model
    assert (tmp_path / "charts.png").stat().st_size > 10_000
