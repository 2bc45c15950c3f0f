"""The team setup with the real parts: an MLflow tracking server on PostgreSQL that serves the
artifacts, two queued experiments run in parallel against it, and a DVC remote that hands the
pipeline's results to a fresh clone (`dvc pull`; `dvc repro` then reruns nothing and `predict`
works on the pulled model).

PostgreSQL is Debian's (`apt-get install postgresql`; `.ci/run` installs it): a throwaway
cluster in a temporary folder, on a free 127.0.0.1 port, run as the `postgres` user when the
test runs as root (the server refuses to run as root). Skipped where its programs are absent.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import psycopg2
import pytest
from helpers.processes import free_port, sh
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs"))
import screenshots  # noqa: E402  (docs/screenshots.py: starts and stops `mlflow ui`)

pytestmark = pytest.mark.slow
METRICS = {"train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
           "ten_crop_top1", "ten_crop_top5", "single_crop_top1", "single_crop_top5"}  # fmt: skip


def postgres_programs() -> Path | None:
    """The folder with `initdb` and `postgres`: on PATH, or where Debian installs them."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).parent
    installed = list(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return max(installed, key=lambda p: int(p.parts[-3])).parent if installed else None


@contextlib.contextmanager
def postgres(programs: Path) -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1 that trusts local connections; yields its
    SQLAlchemy address. Stopped (its whole process group) and deleted afterwards."""
    user = "postgres" if os.geteuid() == 0 else None  # the server refuses to run as root
    # Not under pytest's tmp_path: that folder is root's alone, and the server runs as `user`.
    folder = Path(tempfile.mkdtemp(prefix="convnet-postgres-"))
    if user:
        account = pwd.getpwnam(user)
        os.chown(folder, account.pw_uid, account.pw_gid)
    port = free_port()
    try:
        subprocess.run(
            [programs / "initdb", "-D", folder / "data", "-U", "mlflow", "--auth=trust",
             "--no-locale", "-E", "UTF8", "--no-sync"],
            user=user, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        with open(folder / "server.log", "w") as log:
            server = subprocess.Popen(
                [programs / "postgres", "-D", folder / "data", "-h", "127.0.0.1",
                 "-p", str(port), "-k", folder, "-F"],  # -F: no fsync, a throwaway database
                user=user, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            address = f"mlflow@127.0.0.1:{port}/postgres"
            deadline = time.monotonic() + 60
            while True:
                try:
                    psycopg2.connect(f"postgresql://{address}").close()
                    break
                except psycopg2.OperationalError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        said = (folder / "server.log").read_text()[-2000:]
                        raise RuntimeError(f"PostgreSQL did not start:\n{said}") from None
                    time.sleep(0.3)
            # The driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3.
            yield f"postgresql+psycopg2://{address}"
        finally:
            screenshots.stop_group(server, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def wait_for_queue(path: Path, env: dict, timeout: float = 600) -> str:
    """`dvc queue status` once nothing is queued or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = sh("dvc", "queue", "status", cwd=path, env=env)
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    raise AssertionError(f"the queue did not finish:\n{status}")


def test_tracking_server_on_postgres_and_a_dvc_remote(repo, tmp_path):
    programs = postgres_programs()
    if programs is None:
        pytest.skip("needs PostgreSQL's initdb and postgres (apt-get install postgresql)")
    path, env = repo
    artifacts = tmp_path / "artifacts"
    server_env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true",
                      # Its job runner (GenAI features) is not needed: fewer processes.
                      MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # fmt: skip
    options = ["--serve-artifacts", "--artifacts-destination", str(artifacts), "--workers", "2"]
    # `mlflow ui` is MLflow's alias of `mlflow server`: the same server, these options included.
    with (
        postgres(programs) as database,
        screenshots.mlflow_ui(database, options=options, env=server_env) as url,
    ):
        team = env | {"MLFLOW_TRACKING_URI": url, "MLFLOW_DISABLE_TELEMETRY": "true",
                      "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}  # fmt: skip
        # The baseline, then two experiments at once, all logging to the server.
        sh("dvc", "repro", cwd=path, env=team)
        sh("dvc", "exp", "run", "--queue", "-S", "model=logreg,mlp", "-S", "train.epochs=1",
           cwd=path, env=team)  # fmt: skip
        sh("dvc", "queue", "start", "-j", "2", cwd=path, env=team)
        status = wait_for_queue(path, team)
        assert status.count("Success") == 2, status

        client = mlflow.MlflowClient(url)
        experiment = client.get_experiment_by_name("convnet-pipeline")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 3, [r.info.run_name for r in runs]
        for run in runs:
            assert run.info.status == "FINISHED", run.info.run_name
            assert set(run.data.metrics) >= METRICS, (run.info.run_name, run.data.metrics)
            epochs = int(run.data.params["train.epochs"])
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
            assert steps == list(range(1, epochs + 1)), run.info.run_name
            # The server stored the artifacts (--serve-artifacts), not the client's disk.
            assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
            listed = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
            assert "evaluate/confusion_matrix.png" in listed
        assert len(list(artifacts.rglob("confusion_matrix.png"))) == 3
        assert not (path / "mlartifacts").exists() and not (path / "mlflow.db").exists()

    # Share the baseline's results through a DVC remote; a teammate's fresh clone pulls them.
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "shared", str(remote), cwd=path, env=env)
    sh("git", "add", "dvc.lock", "out", ".dvc/config", cwd=path, env=env)
    sh("git", "commit", "-q", "-m", "baseline and its remote", cwd=path, env=env)
    sh("dvc", "push", cwd=path, env=env)
    clone = tmp_path / "teammate"
    sh("git", "clone", "-q", str(path), str(clone), cwd=tmp_path, env=env)
    sh("dvc", "pull", cwd=clone, env=env)
    model = clone / "out/train/model.pt"
    assert model.read_bytes() == (path / "out/train/model.pt").read_bytes()
    made = model.stat().st_mtime_ns
    said = sh("dvc", "repro", cwd=clone, env=env)
    # Only `inputs` runs, making the data folder a fresh clone lacks; every stage that works
    # (download ... report) is up to date with what was pulled.
    ran = [line for line in said.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'inputs':"], said
    for stage in ("download", "preprocess", "train", "evaluate", "report"):
        assert f"Stage '{stage}' didn't change, skipping" in said, said
    assert model.stat().st_mtime_ns == made
    assert "up to date" in sh("dvc", "status", cwd=clone, env=env)

    image = np.load(clone / "out/processed/val_images.npy")[0]  # (H, W, 3) uint8
    Image.fromarray(image).save(tmp_path / "digit.png")
    said = sh(sys.executable, "-m", "stages", "predict", str(tmp_path / "digit.png"),
              cwd=clone, env=env)  # fmt: skip
    assert f"{tmp_path / 'digit.png'}:" in said and "%" in said, said
