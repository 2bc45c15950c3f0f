"""The MLflow store never costs a trained model: a sqlite lock or a stopped server mid-training
is waited out in the background, what the store never takes is logged later, and a store that
does not answer at the start stops training at once with one line. Real stores: a sqlite file
locked by another connection, an `mlflow server` on 127.0.0.1 stopped and started again."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
from helpers.fabricate import SLOW_EPOCH, setup
from helpers.processes import env, free_port, with_store

from stages.core.tracking import PROBE_SECONDS

REPO = Path(__file__).resolve().parents[1]
CURVES = ("train_loss", "val_top1", "system/cpu_utilization_percentage")
# A training of 15 s or more, so the store fails while training still runs, however late the
# test reads its output.
LONG = {"n_train": SLOW_EPOCH, "epochs": 60}


class Command:
    """`python -m stages ...` in `root`, its output (stdout and stderr) read as it comes."""

    def __init__(self, root: Path, environ: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stages", *args], cwd=root, env=environ, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    @property
    def epochs(self) -> int:
        return sum(line.startswith("epoch ") for line in self.lines)

    def until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Read lines until `done()`; False if the output ended or `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while not done():
            try:
                line = self._new.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    return False
                continue
            if line is None:
                return done()
            self.lines.append(line)
        return True

    def finish(self, timeout: float = 300) -> int:
        """Its exit code, once its output ended (AssertionError if it runs past `timeout`)."""
        self.until(lambda: False, timeout)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {timeout} s:\n{self.output}") from None

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Command]]:
    """Start Commands; any still running when the test ends is killed."""
    started: list[Command] = []

    def start(root: Path, environ: dict[str, str], *args: str) -> Command:
        started.append(Command(root, environ, *args))
        return started[-1]

    yield start
    for command in started:
        if command.proc.poll() is None:
            command.proc.kill()
            command.proc.wait()


@contextlib.contextmanager
def locked(db: Path) -> Iterator[None]:
    """Another process's exclusive lock on the sqlite store: nobody reads or writes it."""
    con = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        con.execute("ROLLBACK")
        con.close()


class Server:
    """`mlflow server` on 127.0.0.1:`port` over a sqlite store in `folder`; stop() ends its
    whole process group, start() brings it back on the same port and store."""

    def __init__(self, folder: Path, port: int) -> None:
        folder.mkdir(exist_ok=True)
        self.folder, self.port, self.proc = folder, port, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 180) -> None:
        exe = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(exe), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
             "--artifacts-destination", str(self.folder / "artifacts")],
            cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def server(folder: Path) -> Iterator[Server]:
    handle = Server(folder, free_port())
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


def only_run(uri: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "convnet-pipeline"]
    [run] = client.search_runs([experiment.experiment_id])
    return run


def assert_complete(root: Path, uri: str, epochs: int, status: str = "FINISHED") -> None:
    """model.pt written; the run holds every epoch's curves, its files and model; nothing is
    left pending."""
    assert (root / "out/train/model.pt").exists()
    assert not (root / "out/train/mlflow-pending").exists()
    run = only_run(uri)
    client = mlflow.MlflowClient(uri)
    assert run.info.status == status
    for key in CURVES:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), key
    assert run.data.params["train.epochs"] == str(epochs)
    if status == "FINISHED":
        files = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"history.csv", "mean.png"} <= files
        [model] = client.search_logged_models([run.info.experiment_id])
        assert model.source_run_id == run.info.run_id and model.name == "digits-mlp"


@pytest.mark.slow
def test_a_sqlite_store_locked_for_10_s_mid_training_costs_nothing(tmp_path, spawn):
    """Training goes on while another process holds the store (MLflow alone blocked it, then
    failed after 20 s); every epoch's metrics reach the run once the lock is gone."""
    root = tmp_path / "lock"
    setup(root, **LONG)
    train = spawn(root, env(root), "train")
    assert train.until(lambda: train.epochs >= 1, 300), train.output
    with locked(root / "mlflow.db"):
        start, before = time.monotonic(), train.epochs
        train.until(lambda: train.epochs >= before + 5 and time.monotonic() - start >= 10, 90)
        during = train.epochs - before
    assert train.finish() == 0, train.output
    assert during >= 5, train.output  # epochs finished while the store was locked
    assert_complete(root, f"sqlite:///{root}/mlflow.db", LONG["epochs"])


@pytest.mark.slow
def test_an_mlflow_server_stopped_and_restarted_mid_training_costs_nothing(tmp_path, spawn):
    root = tmp_path / "served"
    setup(root, **LONG)
    with server(tmp_path / "server") as store:
        # MLflow's own retries of one request (minutes, doubling) are off: the log retries.
        train = spawn(root, env(root, store.url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"), "train")
        assert train.until(lambda: train.epochs >= 1, 300), train.output
        store.stop()
        before = train.epochs
        train.until(lambda: train.epochs >= before + 5, 60)
        during = train.epochs - before
        store.start()
        assert train.finish() == 0, train.output
        assert during >= 5, train.output  # epochs finished while the server was down
        # Epochs went on between the store's failure and its return, in the training's own order.
        failed, back = (next(i for i, line in enumerate(train.lines) if text in line)
                        for text in ("does not answer", "answers again"))  # fmt: skip
        assert any(line.startswith("epoch ") for line in train.lines[failed:back]), train.output
        assert_complete(root, store.url, LONG["epochs"])


@pytest.mark.slow
def test_what_the_store_never_took_is_logged_later_by_log_pending(tmp_path, spawn):
    """Ctrl-C while the store is locked: the run cannot even be marked FAILED. A second Ctrl-C
    stops waiting; the last line names what the run lacks and the command that logs it."""
    root = tmp_path / "pending"
    setup(root, **LONG)
    train = spawn(root, env(root), "train")
    assert train.until(lambda: train.epochs >= 1, 300), train.output
    with locked(root / "mlflow.db"):
        start, before = time.monotonic(), train.epochs
        assert train.until(lambda: train.epochs >= before + 5 and time.monotonic() - start >= 2,
                           60), train.output  # fmt: skip
        train.proc.send_signal(signal.SIGINT)
        assert train.until(lambda: "Ctrl-C stops waiting" in train.output, 120), train.output
        train.proc.send_signal(signal.SIGINT)
        assert train.finish() == 130, train.output
    [lacks] = [line for line in train.lines if "lacks" in line]
    # The epochs after the lock (the one being saved at Ctrl-C too, if it was queued).
    found = re.search(r"the metrics \(epochs? [^)]*?(\d+)\)", lacks)
    assert found, train.output
    last = int(found[1])
    assert last in (train.epochs, train.epochs + 1), lacks
    assert "its end (FAILED)" in lacks and "`convnet log-pending` logs them" in lacks
    assert train.lines[-1].startswith("error: interrupted by Ctrl-C (SIGINT); training stopped")
    assert (root / "out/train/mlflow-pending").is_dir()

    logged = spawn(root, env(root), "log-pending")
    assert logged.finish() == 0, logged.output
    assert "now has" in logged.output and "its end (FAILED)" in logged.output
    run = only_run(f"sqlite:///{root}/mlflow.db")
    assert run.info.status == "FAILED"
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
    assert sorted(steps) == list(range(1, last + 1))
    assert not (root / "out/train/mlflow-pending").exists()
    again = spawn(root, env(root), "log-pending")
    assert again.finish() == 0 and again.lines == ["MLflow: nothing waits"], again.output


def _refused_at_start(spawn, root: Path, environ: dict[str, str], *reasons: str) -> str:
    """`train` exits 1 with one line naming the store and one of `reasons`, before it trains;
    that line."""
    train = spawn(root, environ, "train")
    assert train.finish(timeout=120) == 1, train.output
    [line] = train.lines
    store = f"error: MLflow store {environ['MLFLOW_TRACKING_URI']}: "
    assert any(line.startswith(store + reason) for reason in reasons), line
    assert not (root / "out/train").exists()  # nothing trained, nothing written
    return line


@pytest.mark.slow
def test_a_corrupt_or_locked_sqlite_store_stops_training_before_it_starts(tmp_path, spawn):
    root = tmp_path / "corrupt"
    setup(root)
    db = root / "mlflow.db"
    db.write_bytes(b"not a database " * 1000)
    _refused_at_start(spawn, root, env(root), "file is not a database; ")

    db.unlink()
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()  # a new, empty store
    with locked(db):  # sqlite's own wait (5 s) ends first, unless the machine is busy
        line = _refused_at_start(
            spawn, root, env(root), "database is locked; ", f"no answer within {PROBE_SECONDS} s; "
        )
    assert "wait for (or stop)" in line


def test_a_store_that_never_answers_is_one_line_once_the_probe_gives_up(tmp_path, monkeypatch):
    """A server that takes the connection and never answers, with the user's own long HTTP
    timeout (kept): the stage does not wait for it."""
    from stages.core import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "PROBE_SECONDS", 2)
    with socket.socket() as hanging:  # the kernel takes connections; nothing ever answers
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(8)
        url = f"http://127.0.0.1:{hanging.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
        began = time.monotonic()
        with pytest.raises(tracking.TrackingError) as stopped:
            tracking.setup()
    assert time.monotonic() - began < 10
    assert str(stopped.value) == (
        f"MLflow store {url}: no answer within 2 s; restart the server, or point"
        " MLFLOW_TRACKING_URI at another store"
    )


@pytest.mark.slow
def test_a_server_that_is_down_stops_training_before_it_starts(tmp_path, spawn):
    root = tmp_path / "down"
    setup(root)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    _refused_at_start(spawn, root, env(root, url), "[Errno 111] Connection refused; start the")


def test_a_store_left_mid_write_by_a_killed_process_is_rolled_back_and_used(tmp_path, monkeypatch):
    """A process killed while it wrote to mlflow.db leaves a hot journal: the next stage's check
    rolls the half-done write back (as sqlite does for any writer) and goes on, where a
    read-only look at the file fails with 'attempt to write a readonly database'."""
    from stages.core import tracking

    db = tmp_path / "mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    first = tracking.setup()
    half_done = (  # pages spill to the file mid-transaction; the process dies before commit
        "import os, sqlite3\n"
        f"db = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        "db.execute('PRAGMA cache_size=1'); db.execute('BEGIN')\n"
        "db.execute('CREATE TABLE half(x)')\n"
        "db.executemany('INSERT INTO half VALUES (?)', [(os.urandom(500),)] * 2000)\n"
        "os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", half_done]).returncode == 9
    assert (tmp_path / "mlflow.db-journal").stat().st_size > 0  # hot: the write was cut short
    assert tracking.setup() == first
    tables = {name for (name,) in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}
    assert "half" not in tables and "experiments" in tables


@pytest.mark.slow
def test_training_on_a_machine_whose_cores_are_all_busy_finishes(tmp_path, spawn):
    """Other processes keep every core busy, so MLflow's first connection (imports, the store's
    schema check) is slow: the store check looks for a lock, which nobody holds, instead of
    timing that connection, and the training finishes with its run complete."""
    root = tmp_path / "busy"
    setup(root)
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(2 * len(os.sched_getaffinity(0)))
    ]
    try:
        train = spawn(root, env(root), "train")
        assert train.finish(timeout=900) == 0, train.output
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert_complete(root, f"sqlite:///{root}/mlflow.db", 2)


@pytest.mark.slow
def test_a_run_killed_in_its_first_epoch_is_ended_killed_by_the_next_training(tmp_path, spawn):
    """SIGKILL runs no cleanup, so the run stays RUNNING; the next training in the same
    out/train ends it KILLED, and trains its own run to the end."""
    from stages.core import paths

    root = tmp_path / "killed"
    setup(root, n_train=2 * SLOW_EPOCH)  # an epoch outlasts the 50 ms this test takes to react
    open_run = root / paths.OPEN_RUN
    train = spawn(root, env(root), "train")
    deadline = time.monotonic() + 300
    while not open_run.exists():  # the run exists in the store
        assert train.proc.poll() is None and time.monotonic() < deadline, train.output
        time.sleep(0.05)
    killed = open_run.read_text()
    train.proc.kill()
    train.proc.wait()
    assert not (root / paths.LAST).exists()  # in its first epoch: nothing to resume from
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    assert client.get_run(killed).info.status == "RUNNING"

    again = spawn(root, env(root), "train")
    assert again.finish() == 0, again.output
    assert f"MLflow: run {killed}, left RUNNING by a training killed outright: KILLED" in (
        again.lines
    )
    assert client.get_run(killed).info.status == "KILLED"
    experiment = client.get_experiment_by_name("convnet-pipeline").experiment_id
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([experiment])}
    assert sorted(statuses.values()) == ["FINISHED", "KILLED"]
    assert not open_run.exists()


def test_a_slow_first_connection_to_a_sqlite_store_is_not_taken_for_a_lock(tmp_path, monkeypatch):
    """MLflow's first connection to a store (its imports and schema check) takes seconds on a
    busy machine: made slower than the store check's limit here, it is waited for, since no
    process holds the store locked."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from stages.core import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    monkeypatch.setattr(tracking, "PROBE_SECONDS", 1)
    start = SqlAlchemyStore.__init__

    def slow_start(self, *args, **kwargs) -> None:  # the real one, after a busy machine's wait
        time.sleep(3)
        start(self, *args, **kwargs)

    monkeypatch.setattr(SqlAlchemyStore, "__init__", slow_start)
    experiment = tracking.setup()
    assert mlflow.get_experiment(experiment).name == "convnet-pipeline"
