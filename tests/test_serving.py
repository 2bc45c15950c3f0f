"""The MLflow model a training logs: image files in, `convnet predict`'s answer out, in Python and
through `mlflow models serve` over loopback HTTP."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import fabricate
from helpers.fabricate import make_processed, write_params
from helpers.processes import free_port, with_store
from mlflow.exceptions import MlflowException
from mlflow.types import DataType
from PIL import Image

from stages import params
from stages import train as train_module
from stages.commands.predict import predict
from stages.core import checkpoint
from stages.data.images import ImageFileError, decode_image, read_image
from stages.engine import serving

REPO = Path(__file__).resolve().parents[1]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def logged(tmp_path, monkeypatch) -> tuple[mlflow.pyfunc.PyFuncModel, Path, str]:
    """The fabricated alexnet checkpoint logged as the pyfunc a training logs: the model loaded
    back, the checkpoint, the model's URI."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    ckpt = tmp_path / "model.pt"
    fabricate.save_checkpoint(ckpt, fabricate.model())
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    # An explicit artifact location: a sqlite store's default is ./mlruns of the current folder.
    experiment = client.create_experiment("serving", (tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    # MLflow puts a logged model in the active experiment (as stages.core.runlog does).
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment(experiment_id=experiment)
    info = mlflow.models.Model.log(
        artifact_path=None, name="digits-alexnet", run_id=run.info.run_id,
        **serving.package(ckpt, checkpoint.load(ckpt)),
    )  # fmt: skip
    return mlflow.pyfunc.load_model(info.model_uri), ckpt, info.model_uri


def test_paths_bytes_and_base64_give_predicts_answer(logged, tmp_path):
    """A PNG path, a grey JPEG's bytes and base64 of a wide PNG: per image the top-k names and
    probabilities `convnet predict` gives for the same files (read by the same reader)."""
    model, ckpt, _ = logged
    rng = np.random.default_rng(0)
    x, _ = fabricate.images(1, 3)
    (tmp_path / "a.png").write_bytes(png(x[0]))
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L").save(tmp_path / "b.jpg")
    (tmp_path / "c.png").write_bytes(png(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)))
    files = [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"]
    values = [str(files[0]), files[1].read_bytes(), base64.b64encode(files[2].read_bytes())]
    for top, crops in ((5, 10), (2, 1)):
        got = model.predict(pd.DataFrame({"image": values}), params={"top": top, "crops": crops})
        expected = predict(files, ckpt, top=top, crops=crops, device="cpu")
        assert list(got.columns) == ["classes", "probabilities"] and len(got) == 3
        for (_, row), want in zip(got.iterrows(), expected, strict=True):
            assert row["classes"] == [name for name, _ in want.top]
            assert row["probabilities"] == pytest.approx([p for _, p in want.top], abs=1e-6)
    assert len(got.loc[0, "classes"]) == 2  # top=2 of 4 classes


def test_bytes_are_read_exactly_as_the_file_is(tmp_path):
    """decode_image (what the served model reads) gives read_image's pixels (predict's) for the
    modes that need care: transparency, palette, 16-bit grey, EXIF rotation, a big JPEG."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 255, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "palette.gif")
    wide = rng.integers(0, 65535, (24, 24), dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    photo = Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    photo.save(tmp_path / "rotated.jpg", exif=exif)  # draft mode decodes it at 1/4 scale
    for path in sorted(tmp_path.iterdir()):
        np.testing.assert_array_equal(
            decode_image(path.read_bytes(), 32), read_image(path, 32), err_msg=path.name
        )
    with pytest.raises(ImageFileError, match=r"^upload: not an image file PIL can read$"):
        decode_image(b"<html>", 32, name="upload")


def test_signature_example_and_metadata_say_how_to_call_it(logged):
    model, _, uri = logged
    meta = model.metadata
    assert meta.get_input_schema().input_names() == ["image"]
    assert meta.get_input_schema().input_types() == [DataType.binary]
    assert meta.get_output_schema().input_names() == ["classes", "probabilities"]
    assert {p.name: p.default for p in meta.get_params_schema().params} == {"top": 5, "crops": 10}
    assert meta.metadata["classes"] == fabricate.CLASSES
    # The example a client copies: a PNG of the stored size (the mean image), base64 in JSON.
    folder = Path(mlflow.artifacts.download_artifacts(uri))
    example = json.loads((folder / "serving_input_example.json").read_text())
    [[encoded]] = example["dataframe_split"]["data"]
    pixels = np.array(Image.open(io.BytesIO(base64.b64decode(encoded))))
    assert pixels.shape == (fabricate.SIZE, fabricate.SIZE, 3)
    assert (folder / "artifacts" / "model.pt").is_file()  # the checkpoint travels with it


def test_a_bad_image_or_param_is_one_line_naming_it(logged, tmp_path):
    model, _, _ = logged
    (tmp_path / "notes.txt").write_text("not an image")
    good = png(fabricate.images(1, 3)[0][0])
    cases = [
        ({"image": [good, b"\x89PNG\r\n\x1a\n broken"]}, {}, "image 1: "),
        ({"image": [str(tmp_path / "notes.txt")]}, {}, "notes.txt): not an image file PIL can"),
        ({"image": [str(tmp_path / "gone.png")]}, {}, "gone.png): no such file"),
        ({"image": [good]}, {"crops": 3}, "param 'crops' must be 1 or 10, got 3"),
        ({"image": [good]}, {"top": 0}, "param 'top' must be a positive integer, got 0"),
    ]
    for data, extra, message in cases:
        with pytest.raises(MlflowException) as info:
            model.predict(pd.DataFrame(data), params=extra)
        assert info.value.error_code == "INVALID_PARAMETER_VALUE"
        assert message in info.value.message and "\n" not in info.value.message


class Server(NamedTuple):
    url: str  # the invocations URL
    pid: int  # the process that runs the model (uvicorn, started by `mlflow models serve`)


def _child(parent: int, name: bytes) -> int:
    """The process whose parent is `parent` and whose command line holds `name`."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and name in (entry / "cmdline").read_bytes():
                return int(entry.name)
    raise AssertionError(f"no {name.decode()} process started by {parent}")


@contextlib.contextmanager
def served(uri: str, store: str, cwd: Path, **extra: str) -> Iterator[Server]:
    """`mlflow models serve -m uri --env-manager local` on 127.0.0.1 (its own process group,
    stopped whole), `extra` in its environment; yields it once /ping answers."""
    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, PYTHONPATH=str(REPO), **extra)
    # `mlflow models serve` execs uvicorn by name: the virtualenv's, activated or not.
    env["PATH"] = f"{exe.parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    log = open(cwd / "serve.log", "wb")  # noqa: SIM115 - closed below, after the server
    proc = subprocess.Popen(
        [str(exe), "models", "serve", "-m", uri, "--env-manager", "local", "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                alive = proc.poll() is None and time.monotonic() < deadline
                assert alive, (cwd / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        yield Server(f"http://127.0.0.1:{port}/invocations", _child(proc.pid, b"uvicorn"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_the_registered_model_served_over_http_answers_as_predict(tmp_path, monkeypatch):
    """A training registers its model; `mlflow models serve` answers a PNG (base64 in JSON) with
    the class names and probabilities `convnet predict` gives for the file; a corrupt file is a
    400 with one line naming it, no traceback; the server never opens a path it is sent."""
    make_processed(tmp_path, size=16)
    write_params(tmp_path, epochs=1, register_model=True)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    train_module.train(params.load("params.yaml"))
    version = mlflow.MlflowClient(store).get_latest_versions("convnet-digits-mlp")[0].version

    picture = tmp_path / "digit.png"
    rng = np.random.default_rng(1)
    picture.write_bytes(png(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)))  # resized
    [expected] = predict([picture], tmp_path / "out/train/model.pt", device="cpu")
    encoded = base64.b64encode(picture.read_bytes()).decode()
    with served(f"models:/convnet-digits-mlp/{version}", store, tmp_path) as (url, _):
        status, answer = post(url, {"dataframe_split": {"columns": ["image"], "data": [[encoded]]}})
        assert status == 200, answer
        [row] = answer["predictions"]
        assert row["classes"] == [name for name, _ in expected.top]
        assert row["probabilities"] == pytest.approx([p for _, p in expected.top], abs=1e-6)

        status, answer = post(url, {"inputs": {"image": [encoded]}, "params": {"top": 2}})
        assert status == 200 and answer["predictions"][0]["classes"] == row["classes"][:2]

        corrupt = base64.b64encode(picture.read_bytes()[:200]).decode()  # a truncated PNG
        for body, reason in (
            ({"dataframe_split": {"columns": ["image"], "data": [[encoded], [corrupt]]}},
             "image 1: OSError: image file is truncated"),
            # A path is not opened by the server: its text is taken for the file's bytes.
            ({"inputs": {"image": [str(picture)]}}, "image 0: not an image file PIL can read"),
        ):  # fmt: skip
            status, answer = post(url, body)
            assert status == 400, answer
            assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
            # MLflow puts the request's data first; the last line is the model's own.
            assert answer["message"].splitlines()[-1] == f"Error: {reason}"
            assert "Traceback" not in json.dumps(answer) and "stack_trace" not in answer


@pytest.fixture
def budget(monkeypatch) -> Iterator[Callable[[int], serving.PixelBudget]]:
    """The process's budget of decoded pixels, made anew of the pixels given (and again of the
    environment after the test)."""

    def make(pixels: int) -> serving.PixelBudget:
        monkeypatch.setenv(serving.PIXELS, str(pixels))
        serving._budget.cache_clear()
        return serving._budget()

    yield make
    serving._budget.cache_clear()


def test_the_budget_holds_pixels_in_turn(budget):
    """Threads decode together only as many pixels as the budget holds, and in the order they
    asked: a large image waiting first is not passed over by a small one that would fit."""
    pixels = budget(100)
    held, most, order = [0], [0], []
    lock = threading.Lock()

    def decode(name: str, n: int) -> None:
        with pixels.hold(n, time.monotonic() + 30):
            with lock:
                held[0] += n
                most[0] = max(most[0], held[0])
                order.append(name)
            time.sleep(0.1)
            with lock:
                held[0] -= n

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(decode, [f"t{i}" for i in range(8)], [40] * 8))
    assert most[0] == 80  # two at a time, never three
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        order.clear()
        with pixels.hold(60, time.monotonic() + 30):  # a decode under way
            large = pool.submit(decode, "large", 100)
            while len(pixels._line) < 1:  # the large one waits first...
                time.sleep(0.01)
            small = pool.submit(decode, "small", 30)  # ...the small one would fit beside the 60
            while len(pixels._line) < 2:
                time.sleep(0.01)
        large.result(), small.result()
    assert order == ["large", "small"] and pixels.free == 100


def test_an_image_past_the_budget_is_400_and_no_room_in_time_503(logged, budget, monkeypatch):
    """An image that decodes to more pixels than the whole budget is refused (400) before it is
    decoded; a JPEG counts at the reduced scale it is decoded at. An image that finds no room
    within half MLflow's request timeout is answered 503, saying why; once there is room it is
    answered."""
    model, _, _ = logged
    budget(10_000)
    rng = np.random.default_rng(2)
    large = png(rng.integers(0, 255, (200, 100, 3), dtype=np.uint8))  # 20,000 pixels
    with pytest.raises(MlflowException) as info:
        model.predict(pd.DataFrame({"image": [large]}))
    assert info.value.get_http_status_code() == 400
    assert info.value.message == (
        "image 0: decodes to 20,000 pixels, more than the 10,000 this server decodes at once"
        " (CONVNET_SERVE_PIXELS); make it smaller"
    )
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(buffer, "JPEG")
    photo = buffer.getvalue()  # 160,000 pixels, decoded at 1/8 scale for the 16 px model
    assert len(model.predict(pd.DataFrame({"image": [photo]}))) == 1

    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "1")  # waits 0.5 s
    small = png(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    other = serving._budget().hold(9_900, time.monotonic())  # another request's decode
    with other, pytest.raises(MlflowException) as info:
        model.predict(pd.DataFrame({"image": [small, small]}))
    assert info.value.get_http_status_code() == 503
    assert info.value.message == (
        "image 0: the server is busy decoding other images (at most 10,000 pixels at once,"
        " CONVNET_SERVE_PIXELS) and had no room for it within 0.5 s; retry later"
    )
    assert len(model.predict(pd.DataFrame({"image": [small, small]}))) == 2


@pytest.mark.parametrize("value", ["many", "0", "-5", "1e9"])
def test_a_bad_budget_stops_the_model_loading(logged, budget, value, monkeypatch):
    _, _, uri = logged
    monkeypatch.setenv(serving.PIXELS, value)
    serving._budget.cache_clear()
    with pytest.raises(MlflowException, match=f"^CONVNET_SERVE_PIXELS must be a positive number"
                       f" of pixels, got '{value}'$"):  # fmt: skip
        mlflow.pyfunc.load_model(uri)


def memory(pid: int) -> dict[str, int]:
    """Process `pid`'s resident memory now (VmRSS) and at its peak (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's /proc")
def test_concurrent_large_images_stay_within_the_budget(logged, tmp_path):
    """Twelve concurrent requests, each a 6000 x 6000 PNG (one colour: 100 KB that decode to
    137 MiB as RGB), to `mlflow models serve` with a budget of one such image: every request is
    answered as a lone one is, the server's peak resident memory grows by less than one and a
    half decoded images (unbounded, its threads decode several at once, 5 or more, each
    holding up to 4 copies), and falls back once they are answered (freed memory is handed
    back to the system, not kept in the threads' arenas)."""
    _, _, uri = logged
    side, count = 6000, 12
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 120, 40)).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    del buffer
    body = {"dataframe_split": {"columns": ["image"], "data": [[encoded]]}}
    decoded = side * side * 4  # bytes: Pillow holds an RGB pixel in 4
    store = f"sqlite:///{tmp_path}/mlflow.db"
    extra = {serving.PIXELS: str(side * side), "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "600"}
    with served(uri, store, tmp_path, **extra) as (url, pid):
        status, alone = post(url, body, timeout=300)  # imports and first allocations done
        assert status == 200, alone
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from here
        before = memory(pid)["VmRSS"]
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            answers = list(pool.map(lambda _: post(url, body, timeout=300), range(count)))
        after = memory(pid)
    assert answers == [(200, alone)] * count
    peak, kept, mib = after["VmHWM"] - before, after["VmRSS"] - before, 2**20
    assert peak < 1.5 * decoded, f"peak +{peak / mib:.0f} MiB, an image {decoded / mib:.0f} MiB"
    assert kept < decoded / 2, f"+{kept / mib:.0f} MiB kept once answered"
