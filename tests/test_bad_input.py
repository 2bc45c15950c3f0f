"""The catalogue of bad input: every command, run as a user runs it (a subprocess), given
something wrong. Each case must end with the documented exit code and one `error:` line on
stderr that names what is wrong, no traceback, nothing new or changed under out/ that a later
stage or DVC would take for a result, and no MLflow run left RUNNING.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import json
import os
import resource
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from helpers import fabricate
from helpers.processes import env, with_store
from helpers.remote_data import closed_port_url
from PIL import Image

from stages.core import checkpoint
from stages.params import compose

REPO = Path(__file__).resolve().parents[1]


def tiny_params(model: str = "alexnet") -> dict:
    """params.yaml as conf/ composes it for `model`, shrunk to the fabricated data and a CPU."""
    p = compose(REPO / "conf", [f"model={model}"])
    p["train"] |= {"crop_size": fabricate.CROP, "epochs": 1, "device": "cpu", "batch_size": 8}
    if model == "alexnet":
        p["net"]["fc_width"] = 16
    p["report"] |= {"ascent_steps": 2, "max_channels": 4, "num_images": 4, "augment_images": 4}
    p["evaluate"]["batch_size"] = 32
    return p


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A finished run in miniature: processed data, model.pt, history, predictions, an image."""
    root = tmp_path_factory.mktemp("template")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    shutil.copytree(REPO / "conf", root / "conf")  # what -S model=... composes
    fabricate.processed(root)
    fabricate.save_checkpoint(root / "out/train/model.pt", fabricate.model())
    fabricate.history_and_predictions(root)
    (root / "images").mkdir()
    Image.fromarray(fabricate.images(1, 5)[0][0]).save(root / "images/good.png")
    with_store(root)
    return root


# --- things a user might hand us instead of what a command expects ---------------------------


def write(path: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def use_model(model: str) -> Callable[[Path], None]:
    """params.yaml shrunk as the template's, for another model (-S model= would compose conf/
    anew, at the default data's crop size)."""
    return write("params.yaml", yaml.safe_dump(tiny_params(model)))


def text_file(path: str) -> Callable[[Path], None]:
    return write(path, "this is not a checkpoint\n")


def random_bytes(path: str) -> Callable[[Path], None]:
    return write(path, np.random.default_rng(0).bytes(4096))


def tagged_dict_missing_keys(path: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        torch.save({"format": checkpoint.FORMAT, "net": "alexnet"}, root / path)

    return setup


def unknown_net(path: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        state = torch.load(root / "out/train/model.pt", weights_only=True)
        torch.save(state | {"net": "resnet9"}, root / path)

    return setup


class RunsCode:
    """A pickle that runs a shell command when unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def code_pickle(path: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        torch.save({"format": checkpoint.FORMAT, "payload": RunsCode()}, root / path)

    return setup


def mkdir(path: str) -> Callable[[Path], None]:
    return lambda root: (root / path).mkdir(parents=True, exist_ok=True)


def remove(path: str) -> Callable[[Path], None]:
    def gone(root: Path) -> None:
        target = root / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return gone


def other_dataset(root: Path) -> None:
    info_path = root / "out/processed/info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps(info | {"dataset": "shapes"}))


def other_classes(root: Path) -> None:
    (root / "out/processed/classes.json").write_text(json.dumps(["a", "b", "c", "d"]))


def bomb_png(path: str) -> Callable[[Path], None]:
    """A PNG whose header claims 20,000 x 20,000 pixels: PIL refuses it as a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
    return write(path, data + chunk(b"IEND", b""))


def folder_of_images(classes: list[bytes | str], extra: Callable[[Path], None] | None = None):
    """data/images/<class>/*.png (names as bytes allow names that are not UTF-8)."""

    def setup(root: Path) -> None:
        for name in classes:
            folder = os.path.join(os.fsencode(root / "data/images"), os.fsencode(name))
            os.makedirs(folder, exist_ok=True)
            for i in range(3):
                image = Image.new("RGB", (20, 20), (60 * i, 0, 0))
                image.save(os.fsdecode(os.path.join(folder, f"{i}.png".encode())))
        if extra:
            extra(root)

    return setup


def raw_folder_with(extra: Callable[[Path], None]) -> Callable[[Path], None]:
    """out/raw/folder/{a,b}/ with three good images each, then `extra`."""

    def setup(root: Path) -> None:
        for name in ("a", "b"):
            folder = root / "out/raw/folder" / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (60 * i, 0, 0)).save(folder / f"{i}.png")
        extra(root)

    return setup


def raw_mnist(break_magic: bool) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        raw = root / "out/raw"
        raw.mkdir(parents=True)
        for prefix, n in (("train", 4), ("t10k", 2)):
            magic = 0x00000803 + (1 if break_magic else 0)
            images = struct.pack(">IIII", magic, n, 28, 28) + bytes(n * 28 * 28)
            labels = struct.pack(">II", 0x00000801, n) + bytes(n)
            (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
            (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))

    return setup


def raw_cifar_truncated(root: Path) -> None:
    folder = root / "out/raw/cifar-10-batches-bin"
    folder.mkdir(parents=True)
    (folder / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (folder / name).write_bytes(bytes(3073 * 2 + 100))


def params_text(text: str) -> Callable[[Path], None]:
    return write("bad.yaml", text)


def truncated(path: str, keep: int) -> Callable[[Path], None]:
    """`path` cut to its first `keep` bytes, as a full disk or a killed copy leaves it."""

    def setup(root: Path) -> None:
        data = (root / path).read_bytes()
        (root / path).write_bytes(data[:keep])

    return setup


def fewer_labels(root: Path) -> None:
    """train_labels.npy three short of the images (replaced by hand, or from another run)."""
    labels = np.load(root / "out/processed/train_labels.npy")
    np.save(root / "out/processed/train_labels.npy", labels[:-3])


# --- the catalogue -----------------------------------------------------------------------------


def checkpoint_of(path: str, crop: int = fabricate.CROP, size: int = fabricate.SIZE,
                  **kwargs) -> Callable[[Path], None]:  # fmt: skip
    """A checkpoint at `path` of another input size (same classes), or other `classes`/`data`."""
    return lambda root: fabricate.save_checkpoint(
        root / path, fabricate.model(crop=crop, size=size), crop=crop, size=size, **kwargs
    )


@dataclass
class Case:
    id: str
    args: list[str]
    error: str  # a substring the single `error:` line must contain
    code: int = 1
    setup: Callable[[Path], None] | None = None
    skip: str = ""  # why the case cannot happen on this machine ("" = it runs)
    fsize: int = 0  # the process's file-size limit (`ulimit -f`), in bytes (0: none)


# Class names that are words, as a Tiny ImageNet model has (its checkpoint carries the wnids).
WORDS = ["rocking chair", "goldfish", "lemon", "school bus"]

# Where CUDA works, train.device=cuda is no mistake: the run trains.
CUDA = "a CUDA GPU is visible: train.device=cuda trains" if torch.cuda.is_available() else ""


CASES = [
    # params.yaml and -S overrides: exit 2, before any work
    Case("unknown-key", ["train", "-S", "train.lrr=0.1"], "error: -S train.lrr: unknown key", 2),
    Case(
        "net-not-a-key",
        ["train", "-S", "model=mlp", "-S", "net.width=3"],
        "net.width: not a key of params.yaml",
        2,
    ),  # fmt: skip
    Case(
        "params-yaml",
        ["train", "--params", "bad.yaml"],
        "error: bad.yaml: not valid YAML: line 2, column 1: expected ',' or ']'",
        2,
        params_text("train: [unclosed\n"),
    ),  # fmt: skip
    # download
    Case(
        "mnist-offline",
        [
            "download",
            "-S",
            "dataset=mnist",
            "-S",
            f"download.mirror={closed_port_url()}",
            "-S",
            "download.retries=1",
        ],
        "4 of the 4 files of mnist are not in data/",
    ),  # fmt: skip
    Case("data-dir-file", ["inputs"], "data_dir data: is a file", setup=write("data", "x")),
    Case(
        "data-dir-outside",
        ["inputs", "-S", "download.data_dir=/nonexistent/data"],
        "download.data_dir /nonexistent/data: not found",
    ),  # fmt: skip
    Case(
        "data-dir-not-pulled",
        ["inputs"],
        "data: missing, but data.dvc versions it: run `dvc pull data.dvc`",
        setup=write("data.dvc", "outs:\n- md5: 0123.dir\n  path: data\n"),
    ),  # fmt: skip
    Case("folder-missing", ["download", "-S", "dataset=folder"], "data/images: not found"),
    Case(
        "folder-one-class",
        ["download", "-S", "dataset=folder"],
        "found 1 class folder",
        setup=folder_of_images(["cats"]),
    ),  # fmt: skip
    Case(
        "folder-not-utf8",
        ["download", "-S", "dataset=folder"],
        "caf\\xe9: the class folder",
        setup=folder_of_images([b"caf\xe9", "dogs"]),
    ),  # fmt: skip
    Case(
        "archive-checksum",
        ["download", "-S", "dataset=cifar10"],
        "expected c32a1d4a",
        setup=write("data/cifar-10-binary.tar.gz", b"not the archive"),
    ),  # fmt: skip
    # preprocess
    Case("raw-missing", ["preprocess", "-S", "dataset=mnist"], "missing; out/raw is not"),
    Case(
        "mnist-magic",
        ["preprocess", "-S", "dataset=mnist"],
        "idx magic number",
        setup=raw_mnist(break_magic=True),
    ),  # fmt: skip
    Case(
        "cifar-truncated",
        ["preprocess", "-S", "dataset=cifar10"],
        "3073-byte records",
        setup=raw_cifar_truncated,
    ),  # fmt: skip
    Case(
        "preprocess-file-size",
        ["preprocess", "-S", "dataset=folder"],
        "out/processed: would grow past the file-size limit of this process (`ulimit -f`",
        setup=raw_folder_with(lambda root: None),
        fsize=4000,
    ),  # fmt: skip
    Case(
        "folder-bad-image",
        ["preprocess", "-S", "dataset=folder"],
        "could not be decoded: out/raw/folder/a/x.png",
        setup=raw_folder_with(write("out/raw/folder/a/x.png", b"broken")),
    ),  # fmt: skip
    # train
    Case("no-processed", ["train"], "no preprocessed data", setup=remove("out/processed")),
    Case(
        "images-truncated",
        ["train"],
        "train_images.npy: damaged or not a .npy array",
        setup=truncated("out/processed/train_images.npy", 1000),
    ),  # fmt: skip
    Case(
        "info-invalid",
        ["train"],
        "info.json: not valid JSON",
        setup=write("out/processed/info.json", '{"dataset": "digits", '),
    ),  # fmt: skip
    Case(
        "classes-missing",
        ["evaluate"],
        "classes.json: missing; run `dvc repro preprocess`",
        setup=lambda root: (root / "out/processed/classes.json").unlink(),
    ),  # fmt: skip
    Case("labels-short", ["train"], "37 labels for the 40 images", setup=fewer_labels),
    Case("other-dataset", ["train"], "dataset='shapes' (params: 'digits')", setup=other_dataset),
    Case("init-missing", ["train", "-S", "train.init=none.pt"], "none.pt: no checkpoint"),
    Case("init-text", ["train", "-S", "train.init=x.pt"], "x.pt: not a", setup=text_file("x.pt")),
    Case(
        "init-random", ["train", "-S", "train.init=x.pt"], "x.pt: not a", setup=random_bytes("x.pt")
    ),  # fmt: skip
    Case(
        "init-missing-keys",
        ["train", "-S", "train.init=x.pt"],
        "x.pt: ",
        setup=tagged_dict_missing_keys("x.pt"),
    ),  # fmt: skip
    Case(
        "init-code",
        ["train", "-S", "train.init=x.pt"],
        "asks to run code",
        setup=code_pickle("x.pt"),
    ),  # fmt: skip
    Case("init-dir", ["train", "-S", "train.init=images"], "images: "),
    Case(
        "batch-norm-one",
        ["train", "-S", "train.batch_size=1"],
        "resnet18 has batch norm, which needs at least 2 images",
        setup=use_model("resnet18"),
    ),  # fmt: skip
    Case(
        "crop-over-the-data",
        ["train", "-S", "train.crop_size=28"],
        "train.crop_size is 28 but the processed images are 16x16",
    ),  # fmt: skip
    Case("no-gpu", ["train", "-S", "train.device=cuda"], "no CUDA GPU is visible", skip=CUDA),
    Case("last-corrupt", ["train"], "out/train/last.pt: ", setup=text_file("out/train/last.pt")),
    Case(
        "train-file-size",
        ["train"],
        "out/train/last.pt: would grow past the file-size limit of this process (`ulimit -f`",
        fsize=2_000_000,  # the store fits; the first checkpoint (9 MB) does not
    ),  # fmt: skip
    Case(
        "store-file-size",
        ["train"],
        # After sqlite's own words ("disk I/O error"), the limit: not "move the file aside".
        "mlflow.db: disk I/O error; this process may write files of at most 97.7 KiB (`ulimit",
        setup=remove("mlflow.db"),
        fsize=100_000,  # a new store does not fit
    ),  # fmt: skip
    # evaluate
    Case(
        "eval-no-model",
        ["evaluate"],
        "no checkpoint; run `dvc repro train`",
        setup=remove("out/train"),
    ),  # fmt: skip
    Case("eval-text", ["evaluate"], "model.pt: not a", setup=text_file("out/train/model.pt")),
    Case(
        "eval-random", ["evaluate"], "model.pt: not a", setup=random_bytes("out/train/model.pt")
    ),  # fmt: skip
    Case(
        "eval-missing-keys",
        ["evaluate"],
        "model.pt: ",
        setup=tagged_dict_missing_keys("out/train/model.pt"),
    ),  # fmt: skip
    Case(
        "eval-unknown-net",
        ["evaluate"],
        "cannot be rebuilt",
        setup=unknown_net("out/train/model.pt"),
    ),  # fmt: skip
    Case("eval-code", ["evaluate"], "asks to run code", setup=code_pickle("out/train/model.pt")),
    Case("eval-other-classes", ["evaluate"], "trained on 4 other classes", setup=other_classes),
    Case(
        "eval-other-size",
        ["evaluate"],
        "out/train/model.pt was trained on 24 px images (crops of 20 px), but out/processed"
        " holds 16 px images",
        setup=checkpoint_of("out/train/model.pt", crop=20, size=24),
    ),  # fmt: skip
    # report
    Case(
        "report-no-history",
        ["report"],
        "out/train/history.csv",
        setup=lambda root: (root / "out/train/history.csv").unlink(),
    ),  # fmt: skip
    Case(
        "report-no-predictions",
        ["report"],
        "out/evaluate/predictions.csv",
        setup=remove("out/evaluate"),
    ),  # fmt: skip
    Case("report-other-dataset", ["report"], "dataset='shapes'", setup=other_dataset),
    Case(
        "report-other-size",
        ["report"],
        "was trained on 24 px images",
        setup=checkpoint_of("out/train/model.pt", crop=20, size=24),
    ),  # fmt: skip
    # predict
    Case(
        "predict-missing",
        ["predict", "images/good.png", "images/none.png"],
        "1 of 2 files could not be read",
    ),  # fmt: skip
    Case(
        "predict-bomb",
        ["predict", "images/good.png", "images/bomb.png"],
        "1 of 2 files could not be read",
        setup=bomb_png("images/bomb.png"),
    ),  # fmt: skip
    Case("predict-dir", ["predict", "images"], "1 of 1 files could not be read"),
    Case("predict-crops", ["predict", "images/good.png", "--crops", "3"], "--crops must be 1"),
    Case("predict-top", ["predict", "images/good.png", "--top", "0"], "--top must be a positive"),
    Case("predict-device", ["predict", "images/good.png", "--device", "gpu"], "device 'gpu'"),
    Case(
        "predict-text-ckpt",
        ["predict", "images/good.png", "--checkpoint", "x.pt"],
        "x.pt: not",
        setup=text_file("x.pt"),
    ),  # fmt: skip
    Case(
        "predict-saliency-dir",
        ["predict", "images/good.png", "--saliency", "images"],
        "--saliency images: is a directory",
    ),  # fmt: skip
    # lr-find
    Case("lrfind-start", ["lr-find", "--start", "0"], "need 0 < --start < --end"),
    Case("lrfind-steps", ["lr-find", "--steps", "1"], "--steps must be at least 2"),
    Case("lrfind-no-data", ["lr-find"], "no preprocessed data", setup=remove("out/processed")),
    # ensemble
    Case("ensemble-unknown", ["ensemble", "0123456789abcdef"], "neither a checkpoint file"),
    Case("ensemble-text", ["ensemble", "x.pt"], "x.pt: not a", setup=text_file("x.pt")),
    Case("ensemble-crops", ["ensemble", "out/train/model.pt", "--crops", "2"], "--crops must be"),
    Case(
        "ensemble-classes",
        ["ensemble", "out/train/model.pt"],
        "trained on 4 other classes",
        setup=other_classes,
    ),  # fmt: skip
    Case(
        "ensemble-other-size",
        ["ensemble", "out/train/model.pt", "big.pt"],
        "big.pt was trained on 24 px images (crops of 20 px), but out/processed holds 16 px",
        setup=checkpoint_of("big.pt", crop=20, size=24),
    ),  # fmt: skip
    # submit
    Case("submit-no-folder", ["submit", "--images", "nope"], "no such folder of test images"),
    Case(
        "submit-empty",
        ["submit", "--images", "empty"],
        "no .JPEG/.jpg/.png images",
        setup=mkdir("empty"),
    ),  # fmt: skip
    Case(
        "submit-bad-image",
        ["submit", "--images", "test"],
        "test/a.png: ",
        setup=write("test/a.png", b"broken"),
    ),  # fmt: skip
    Case(
        "submit-out-dir",
        ["submit", "--images", "images", "--out", "images"],
        "--out images: is a directory",
    ),  # fmt: skip
    Case(
        "submit-no-wnids",
        ["submit", "--images", "images", "--checkpoint", "words.pt", "--out", "sub.txt"],
        "words.pt: carries no wnids and its classes are not wnids ('rocking chair', ...)",
        setup=checkpoint_of("words.pt", classes=WORDS, data={"dataset": "folder"}),
    ),  # fmt: skip
]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under out/ (and the MLflow artifacts) with a digest of its bytes."""
    files = [f for d in ("out", "mlartifacts") for f in (root / d).rglob("*") if f.is_file()]
    return {str(f.relative_to(root)): hashlib.sha1(f.read_bytes()).hexdigest() for f in files}


def running_runs(root: Path) -> int:
    db = root / "mlflow.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]


def file_size_limit(size: int) -> None:
    """`ulimit -f` for the process about to start (SIGXFSZ stays ignored: Python ignores it)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_the_catalogue_is_large():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.id for c in CASES} >= FAST


# One case per command runs in the fast loop (`-m "not slow"`); each case is a process that
# imports torch and MLflow (seconds), so the rest run with the full suite.
FAST = {"unknown-key", "data-dir-file", "archive-checksum", "folder-bad-image", "init-code",
        "eval-code", "report-no-history", "predict-bomb", "lrfind-steps", "ensemble-text",
        "submit-bad-image"}  # fmt: skip


PARAMS = [pytest.param(c, id=c.id, marks=() if c.id in FAST else pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input(case: Case, template: Path, tmp_path: Path):
    if case.skip:
        pytest.skip(case.skip)
    root = tmp_path / "ws"
    shutil.copytree(template, root)
    if case.setup:
        case.setup(root)
    before = snapshot(root)
    result = subprocess.run(
        [sys.executable, "-m", "stages", *case.args],
        cwd=root, env=env(root), capture_output=True, text=True, timeout=300,
        preexec_fn=(lambda: file_size_limit(case.fsize)) if case.fsize else None,
    )  # fmt: skip
    shown = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == case.code, shown
    assert "Traceback" not in result.stdout + result.stderr, shown
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, shown
    assert case.error in errors[0], shown
    if case.code == 2:  # bad params stop before any work: the error is all there is to say
        assert result.stderr.splitlines() == errors, shown
    assert snapshot(root) == before, "files under out/ were created or changed"
    assert running_runs(root) == 0
    assert not (root / "PWNED").exists()  # a checkpoint never runs code


# --- cases that need more than one line and a clean out/ to check ---------------------------


def run(root: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages", *args], cwd=root, env=env(root), capture_output=True,
        text=True, timeout=300, **kwargs,
    )  # fmt: skip


def workspace(template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(template, root)
    return root


def test_predict_still_classifies_the_good_images(template, tmp_path):
    root = workspace(template, tmp_path)
    bomb_png("images/bomb.png")(root)
    result = run(root, "predict", "images/good.png", "images/bomb.png", "--crops", "1")
    assert result.returncode == 1
    assert "images/good.png:" in result.stdout  # its top-5 block was printed
    # The file's reason on stderr, with the errors, not among the results on stdout.
    assert "images/bomb.png: DecompressionBombError" in result.stderr
    assert "bomb" not in result.stdout


def test_predict_prints_one_line_per_name_whatever_the_name_holds(template, tmp_path):
    """A newline (or a tab) in a file name would split the result; such names come quoted."""
    root = workspace(template, tmp_path)
    shutil.copy(root / "images/good.png", root / "images/a\nb.png")
    shutil.copy(root / "images/good.png", root / "images/tab\t.png")
    (root / "images" / "c\nd.png").write_bytes(b"broken")
    names = ["images/good.png", "images/a\nb.png", "images/tab\t.png", "images/c\nd.png"]
    result = run(root, "predict", *names, "--crops", "1", "--top", "1")
    assert result.returncode == 1, result.stderr
    headers = [line for line in result.stdout.splitlines() if not line.startswith("  ")]
    assert headers == ["images/good.png:", "'images/a\\nb.png':", "'images/tab\\t.png':"]
    assert len(result.stdout.splitlines()) == 6  # three headers, one class each
    assert result.stderr.splitlines()[0].startswith("'images/c\\nd.png': ")


def test_a_link_out_of_the_data_folder_is_not_followed(template, tmp_path):
    root = workspace(template, tmp_path)
    outside = tmp_path / "secrets"
    outside.mkdir()
    (outside / "id_rsa.png").write_text("private key")
    folder_of_images(["cats", "dogs"])(root)
    (root / "data/images/cats/key.png").symlink_to(outside / "id_rsa.png")
    (root / "data/images/birds").symlink_to(outside, target_is_directory=True)
    (root / "data/images/dogs/again").symlink_to(root / "data/images/cats")  # inside: followed
    result = run(root, "download", "-S", "dataset=folder")
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stdout.splitlines() if line.startswith("download: skipped")]
    # cats/key.png, birds, and key.png again through dogs/again (a link to cats).
    assert len(skipped) == 3 and all("outside" in line for line in skipped)
    copied = sorted(str(f.relative_to(root / "out/raw")) for f in (root / "out/raw").rglob("*"))
    assert not [f for f in copied if "key" in f or "birds" in f]
    assert "folder/dogs/again/0.png" in copied


@pytest.mark.slow
def test_a_batch_larger_than_the_data_counts_the_images_it_saw(template, tmp_path):
    """40 training images in one 100,000 batch: loss, top-1 and images/s are per image seen."""
    root = workspace(template, tmp_path)
    use_model("mlp")(root)
    args = ["-S", "train.epochs=2", "-S", "train.optimizer=sgd", "-S", "train.lr=0.001"]
    big = run(root, "train", "-S", "train.batch_size=100000", *args)
    assert big.returncode == 0, big.stderr
    rows = list(csv.DictReader((root / "out/train/history.csv").read_text().splitlines()))
    # An untrained 4-class model's cross-entropy is about ln 4 = 1.39: counting the batch as
    # 100,000 images gave 0.0006.
    assert all(0.8 < float(r["train_loss"]) < 3 for r in rows)
    assert all(float(r["images_per_second"]) < 50_000 for r in rows)  # 40 images per step


@pytest.mark.slow
def test_ctrl_c_and_sigterm_say_where_training_stopped(template, tmp_path):
    for signum in (signal.SIGINT, signal.SIGTERM):
        root = tmp_path / f"ws{signum}"
        shutil.copytree(template, root)
        use_model("mlp")(root)
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages", "train", "-S", "train.epochs=500"],
            cwd=root, env=env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not (root / "out/train/last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum, err
        assert "Traceback" not in err
        [line] = [line for line in err.splitlines() if line.startswith("error:")]
        assert "interrupted by" in line and "training stopped in epoch" in line
        assert "out/train/last.pt holds epoch" in line and "again to resume" in line
        assert running_runs(root) == 0
        assert not list((root / "out/train").glob(".*.tmp"))  # no half-written checkpoint
        assert "model.pt" in os.listdir(root / "out/train")  # the template's, untouched
        # history.csv holds the epochs last.pt holds (one fewer if the signal fell between
        # the two writes), so `dvc plots show` drew the run as far as it went.
        saved = checkpoint.load(root / "out/train/last.pt")["epoch"]
        lines = (root / "out/train/history.csv").read_text().splitlines()
        assert len(lines) - 1 in (saved, saved - 1) and lines[0].startswith("epoch,")


def unshare_works() -> bool:
    try:
        probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="needs unshare -rm (a private mount namespace)")
@pytest.mark.slow
def test_a_full_disk_names_the_path_and_leaves_nothing_behind(template, tmp_path):
    """out/train on a 300 KiB file system: the checkpoint does not fit."""
    root = workspace(template, tmp_path)
    shutil.rmtree(root / "out/train")
    (root / "out/train").mkdir()
    script = (
        "mount -t tmpfs -o size=300k tmpfs out/train && "
        f"{sys.executable} -m stages train; code=$?;"
        " echo LISTING; ls -a out/train; exit $code"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=root, env=env(root), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "out/train/last.pt: needs" in line and "MiB free" in line
    assert result.stdout.split("LISTING")[1].split() == [".", ".."]  # nothing left behind
    assert running_runs(root) == 0


def test_numbers_in_scientific_notation_are_numbers(template, tmp_path):
    root = workspace(template, tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"] |= {"lr": "LR", "weight_decay": "WD"}
    (root / "params.yaml").write_text(
        yaml.safe_dump(params).replace("lr: LR", "lr: 1e-2").replace("decay: WD", "decay: 5e-4")
    )
    assert "lr: 1e-2" in (root / "params.yaml").read_text()
    from stages.params import load

    p = load(root / "params.yaml", ["train.momentum=9e-1", "train.label_smoothing=1E-1"])
    assert (p.train.lr, p.train.weight_decay) == (0.01, 0.0005)
    assert (p.train.momentum, p.train.label_smoothing) == (0.9, 0.1)


# --- the MLflow log a training left pending -----------------------------------------------


def store_with_run(root: Path) -> str:
    """root/mlflow.db (the store the commands are pointed at) holding one finished run: its id."""
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.create_experiment("convnet-pipeline", (root / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id)
    return run_id


def pending(root: Path, name: str, records: list[dict] | str) -> Path:
    """out/train/mlflow-pending/<name>.json holding `records` (text: the file's whole content)."""
    file = root / "out/train/mlflow-pending" / f"{name}.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root}/mlflow.db"
    content = records if isinstance(records, str) else {"uri": uri, "records": records}
    file.write_text(content if isinstance(content, str) else json.dumps(content))
    return file


def file_record(path: str) -> dict:
    """A pending `file` record: "logged" for `path` in the run's artifacts."""
    content = base64.b64encode(b"logged").decode()
    return {"what": path, "kind": "file", "path": path, "content": content, "step": None}


@pytest.mark.slow
def test_a_pending_record_never_writes_outside_its_folder(template, tmp_path):
    """A `file` record names where its file goes: an absolute path or one with `..` in it is set
    aside in one line, the other records logged, nothing written outside."""
    root = workspace(template, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    run_id = store_with_run(root)
    up = "../" * 30 + str(outside / "up.txt").lstrip("/")  # from any temporary folder: /
    records = [
        file_record(str(outside / "absolute.txt")),
        file_record(up),
        file_record("../../../outside/folder.txt"),
        file_record("notes/kept.txt"),
    ]
    file = pending(root, run_id, records)
    began = time.monotonic()
    result = run(root, "log-pending")
    assert time.monotonic() - began < 40  # set aside at once, not retried for 60 s
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    aside = f"out/train/mlflow-pending/set-aside/{run_id}.json"
    assert f"records 1, 2, 3 of 4 can never be logged (record 1: its path '{outside}/" in line
    assert "leads out of the run's artifacts" in line and line.endswith(f"set aside in {aside}")
    assert "does not answer" not in result.stdout + result.stderr
    assert not list(outside.iterdir())  # nothing written outside
    logged = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").list_artifacts(run_id, "notes")
    assert [a.path for a in logged] == ["notes/kept.txt"]
    assert not file.exists()
    assert len(json.loads((root / aside).read_text())["records"]) == 3  # kept for a look
    again = run(root, "log-pending")  # said once: nothing is left to retry
    assert again.returncode == 0 and again.stdout == "MLflow: nothing waits\n", again.stderr


@pytest.mark.slow
def test_what_can_never_be_logged_is_set_aside_once_and_training_goes_on(template, tmp_path):
    """A record with a wrong value, a file that is not a pending log and one of a run the store
    does not have: set aside with a line each by the next training (no 60 s wait blaming the
    store, no advice to move the store aside), and never again."""
    root = workspace(template, tmp_path)
    run_id = store_with_run(root)
    batch = {"what": "the metrics", "kind": "batch", "metrics": {"a": "high"}, "step": 3}
    pending(root, run_id, [batch])
    pending(root, "notes", [file_record("a.txt")])  # a json file that names no run
    pending(root, "junk", "{")
    use_model("mlp")(root)
    began = time.monotonic()
    result = run(root, "train")
    assert time.monotonic() - began < 50
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{run_id}.json: record 1 of 1 can never be logged (record 1: batch.metrics.a: " in out
    assert "notes.json: run notes is not in the store" in out
    assert "junk.json: not a pending MLflow log" in out
    assert "does not answer" not in out and "move the file aside" not in out + result.stderr
    assert sorted(f.name for f in (root / "out/train/mlflow-pending").iterdir()) == ["set-aside"]
    again = run(root, "log-pending")
    assert again.returncode == 0 and again.stdout == "MLflow: nothing waits\n", again.stderr


# --- two processes, one workspace; an interrupt in one stage --------------------------------


@pytest.mark.slow
def test_a_second_training_in_one_out_train_says_which_process_holds_it(template, tmp_path):
    root = workspace(template, tmp_path)
    use_model("mlp")(root)
    first = subprocess.Popen(
        [sys.executable, "-m", "stages", "train", "-S", "train.epochs=500"],
        cwd=root, env=env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (root / "out/train/last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        second = run(root, "train")
        assert first.poll() is None, "the first training ended before the second started"
    finally:
        first.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        first.wait(timeout=60)
    assert second.returncode == 1, second.stderr
    [line] = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert f"out/train: a training runs in it already, in process {first.pid} (`" in line
    assert "-S train.epochs=500`" in line and "Traceback" not in second.stderr
    assert "train:" not in second.stdout  # stopped before its banner: no data read
    with sqlite3.connect(root / "mlflow.db") as con:  # and no MLflow run started
        assert con.execute("select count(*) from runs").fetchone()[0] == 1
    from stages.core.files import only_one

    with only_one(root / "out/train", "a training"):  # a killed training leaves no lock
        pass


@pytest.mark.slow
def test_an_interrupt_while_evaluate_logs_leaves_the_training_run_as_it_was(
    template, tmp_path, monkeypatch
):
    """Ctrl-C after evaluate wrote its outputs, while it adds them to the training's MLflow run:
    that run stays FINISHED, with its end time, and `convnet results` still finds it."""
    from stages.commands import results
    from stages.core import errors
    from stages.core.runlog import run_log
    from stages.evaluate import evaluate
    from stages.params import load

    root = workspace(template, tmp_path)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(root)}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    tags = {"dataset": "digits", "model": "alexnet"}
    with run_log(None, run_name="digits/alexnet", tags=tags) as training:
        pass
    run_id = training.run_id
    fabricate.save_checkpoint(root / "out/train/model.pt", fabricate.model(), run_id)
    ended = mlflow.get_run(run_id).info
    log_artifact = mlflow.MlflowClient.log_artifact

    def ctrl_c_while_logging(*args, **kwargs):  # the real one, with a Ctrl-C inside
        os.kill(os.getpid(), signal.SIGINT)
        return log_artifact(*args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", ctrl_c_while_logging)
    old = signal.signal(signal.SIGINT, errors.on_signal)
    try:
        with pytest.raises(errors.Interrupted):
            evaluate(load(root / "params.yaml"))
    finally:
        signal.signal(signal.SIGINT, old)
    assert (root / "out/evaluate/metrics.json").is_file()  # written before the interrupt
    now = mlflow.get_run(run_id).info
    assert (now.status, now.end_time) == ("FINISHED", ended.end_time)
    [row] = results.collect()
    # The model is fabricated, untrained (measured 0.25: chance): no figure to reach, but the
    # row holds the one evaluate measured.
    measured = json.loads((root / "out/evaluate/metrics.json").read_text())["ten_crop"]
    assert row.run_id == run_id and row.metrics["ten_crop_top1"] == measured["top1"]


@pytest.mark.skipif(not unshare_works(), reason="needs unshare -rm (a private mount namespace)")
@pytest.mark.slow
def test_a_read_only_out_is_one_line_naming_it(template, tmp_path):
    """out/train, then all of out/, mounted read-only: train and evaluate stop in one line each,
    before any work, and nothing changes."""
    root = workspace(template, tmp_path)
    before = snapshot(root)
    python = f"{sys.executable} -m stages"
    script = (
        "mount --bind out/train out/train && mount -o remount,bind,ro out/train &&"
        f" {python} train; echo CODE $?;"
        f" mount --bind out out && mount -o remount,bind,ro out && {python} evaluate; echo CODE $?"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=root, env=env(root), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    codes = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("CODE")]
    assert codes == ["1", "1"], result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors[0].startswith("error: out/train: cannot be written: it is on a read-only file")
    assert errors[1].startswith("error: out/evaluate: cannot be written: it is on a read-only")
    assert len(errors) == 2 and snapshot(root) == before
    assert running_runs(root) == 0


# --- params and the command line: conf/ as `compose` and the stages read it; `dvc exp run` ---


def edit(file: str, text: str, new: str) -> Callable[[Path], None]:
    """Replace `text` by `new` in conf/`file` (where `text` must be)."""

    def setup(root: Path) -> None:
        path = root / "conf" / file
        assert text in path.read_text(), (file, text)
        path.write_text(path.read_text().replace(text, new, 1))

    return setup


# (id, conf/ edit, the choice the commands make, the error, fast): `compose --write` must refuse
# exactly what a stage composing the same choice refuses, before writing params.yaml.
CONF_CASES = [
    ("conf-yaml-1-1", edit("config.yaml", "seed: 0\n", "seed: 017\n"), "model=mlp",
     "conf/config.yaml: line 15, column 7: YAML 1.2 (DVC, params.yaml) reads 17 but YAML 1.1"
     " (Hydra, conf/) reads 15", True),
    ("conf-duplicate-key", edit("model/mlp.yaml", "  lr: 0.001", "  lr: 0.001\n  lr: 0.01"),
     "model=mlp", "conf/model/mlp.yaml: not valid YAML: line 12, column 3: found duplicate key"
     ' "lr" (while constructing a mapping that starts on line 8)', False),
    ("conf-syntax", edit("recipe/baseline-mlp.yaml", "train:", "train: {"), "model=mlp",
     "conf/recipe/baseline-mlp.yaml: not valid YAML: line", True),
    ("two-models", None, "model=[alexnet,resnet18]", "-S 'model=[alexnet,resnet18]': one model"
     " at a time, a file of conf/model/", True),
    ("conf-net-key", edit("model/mlp.yaml", "net:\n", "net:\n  depth: 3\n"), "model=mlp",
     "net.depth: unknown key; valid keys: dropout, hidden", False),
    ("conf-model-name", edit("model/mlp.yaml", "model: mlp", "model: mlp2"), "model=mlp",
     "model: must be one of: alexnet, logreg, mlp, resnet18", False),
]  # fmt: skip


@pytest.mark.parametrize(
    "setup, choice, message",
    [pytest.param(*c[1:4], id=c[0], marks=() if c[4] else pytest.mark.slow) for c in CONF_CASES],
)
@pytest.mark.parametrize("command", [["compose", "--write"], ["train"]])
def test_compose_refuses_what_a_stage_refuses_before_writing(
    template, tmp_path, setup, choice, message, command
):
    root = workspace(template, tmp_path)
    if setup:
        setup(root)
    before, params_yaml = snapshot(root), (root / "params.yaml").read_text()
    result = run(root, *command, "-S", choice)
    shown = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, shown
    assert result.stderr.splitlines() == [result.stderr.strip()], shown  # one line
    assert result.stderr.startswith("error: ") and message in result.stderr, shown
    assert (root / "params.yaml").read_text() == params_yaml and snapshot(root) == before


@pytest.mark.slow
def test_dvc_exp_run_refuses_a_value_before_dvc_removes_any_output(repo):
    """DVC removes a stage's outputs before running it, and `dvc exp run -S` writes the value
    into params.yaml first: the inputs stage, which depends on every param, refuses it before
    DVC reaches the stage the value is for."""
    path, environment = repo

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["dvc", *args], cwd=path, env=environment, capture_output=True,
                              text=True, timeout=600)  # fmt: skip

    # A finished run, as DVC records one (the outputs stand in for a real run's).
    assert dvc("repro", "inputs").returncode == 0
    outs = [o for s in yaml.safe_load((path / "dvc.yaml").read_text())["stages"].values()
            for o in s.get("outs", []) + s.get("metrics", [])]  # fmt: skip
    for out in (Path(o if isinstance(o, str) else next(iter(o))) for o in outs):
        made = path / (out if out.suffix else out / "made-by-hand")
        made.parent.mkdir(parents=True, exist_ok=True)
        if not made.exists():
            made.write_text(f"{out} of an earlier run")
    assert dvc("commit", "--force").returncode == 0
    subprocess.run(["git", "add", "-A"], cwd=path, env=environment, check=True)
    subprocess.run(["git", "commit", "-qm", "run"], cwd=path, env=environment, check=True)
    before = snapshot(path)
    for value, message in [
        ("train.lr=abc", "train.lr: must be a number, got 'abc'"),
        ("train.epochs=-1", "train.epochs: must be a positive integer, got -1"),
        ("train.lr=1e999", "train.lr: must be a finite number, got inf"),
    ]:
        result = dvc("exp", "run", "-S", value)
        said = result.stdout + result.stderr
        assert result.returncode != 0 and "Traceback" not in said, said
        assert "Running stage 'inputs'" in said and "Running stage 'download'" not in said, said
        [error] = [line for line in said.splitlines() if line.startswith("error:")]
        assert message in error, said
        after = snapshot(path)
        assert after == {k: v for k, v in before.items() if k != "out/inputs.json"}, value


# --- speed settings: `precision: auto` reads and writes no cache ----------------------------


@pytest.mark.slow
@pytest.mark.parametrize("home", ["folder", "empty"])
def test_precision_auto_reads_and_writes_nothing_outside_the_workspace(home, template, tmp_path):
    """An empty home folder with a relative XDG_CACHE_HOME, or an empty HOME, and a speed.json of
    the wrong shape where measured speeds were once cached: `train` with `precision: auto`
    decides from the hardware, reads none of them and writes nothing there."""
    from stages.engine.device import bf16_in_hardware

    root = workspace(template, tmp_path)
    speeds = root / "cache/convnet-pipeline/speed.json"  # XDG_CACHE_HOME=cache: in root
    write(str(speeds.relative_to(root)), json.dumps({"alexnet": "not a rate"}))(root)
    folder = tmp_path / "home"
    folder.mkdir()
    # matplotlib keeps its font list in the user's cache folder (a library's cache, rightly
    # there): elsewhere here, so that the folders hold what the project alone writes.
    extra = {"MPLCONFIGDIR": str(tmp_path / "matplotlib")}
    extra |= {"HOME": str(folder), "XDG_CACHE_HOME": "cache"} if home == "folder" else {"HOME": ""}
    environment = env(root, **extra)
    if home == "empty":
        environment.pop("XDG_CACHE_HOME", None)  # the cache folder would be $HOME/.cache
    args = ["-S", "train.precision=auto", "-S", "train.memory_format=auto"]
    result = subprocess.run(
        [sys.executable, "-m", "stages", "train", *args], cwd=root, env=environment,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    precision = "bf16" if bf16_in_hardware(torch.device("cpu")) else "fp32"
    assert f"precision auto -> {precision} (the CPU " in result.stdout.splitlines()[0]
    ran = json.loads((root / "out/train/run.json").read_text())
    assert ran["precision"] == precision
    assert list(folder.iterdir()) == []
    assert not (root / ".cache").exists()  # where an empty HOME's ~/.cache lands
    assert [f for f in (root / "cache").rglob("*") if f.is_file()] == [speeds]
    assert json.loads(speeds.read_text()) == {"alexnet": "not a rate"}
