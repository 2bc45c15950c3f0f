"""The dataset sources: each module declares every part, and the real datasets are accepted
extracted in data/ (checked by structure) as well as archived; copies that are not the official
set are refused in one line naming the difference."""

from __future__ import annotations

import gzip
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import remote_data
from helpers.fabricate import params_from
from helpers.remote_data import closed_port_url

from stages.core.errors import PipelineError
from stages.data import fetch
from stages.data import images as imaging
from stages.data.sources import (
    MODULES,
    SOURCES,
    NotOfficialError,
    cifar10,
    imagenet64,
    mnist,
    tiny_imagenet,
)
from stages.data.sources.base import pad_and_stack
from stages.download import download
from stages.preprocess import preprocess

OUT = Path("out/processed")


@pytest.fixture(autouse=True)
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fetch, "BACKOFF_S", 0.0)
    monkeypatch.setattr(imaging, "CHUNK", 4)
    return tmp_path


def offline(dataset: str):
    """Params whose every network access fails: only data/ can provide the files."""
    crop = {"tiny-imagenet": 56, "imagenet64": 56}.get(dataset, 28)
    return params_from(
        {
            "dataset": dataset,
            "download": {"mirror": closed_port_url(), "retries": 1, "timeout": 5.0},
            "preprocess": {"workers": 2},
            "train": {"crop_size": crop},
        }
    )


def load(name: str) -> np.ndarray:
    return np.load(OUT / name)


def test_every_source_declares_every_part():
    assert len(SOURCES) == len(MODULES)
    for module in MODULES:
        source = module.SOURCE
        assert source.name and source.description, module.__name__
        assert len(inspect.signature(source.read).parameters) == 3, module.__name__
        if source.embedded:  # makes out/raw itself
            assert source.extracted is None and not source.files, module.__name__
        else:  # accepted extracted in data/ (checked by structure), and fetched or fetchable
            assert source.extracted is not None, module.__name__
            assert source.files or source.manual, module.__name__  # where to get it
            assert all(f.urls and f.algorithm in ("md5", "sha256") for f in source.files)
            assert source.image_size is not None, module.__name__


def extract_into_data(members: dict[str, bytes], change=None) -> None:
    """Write an archive's members under data/, as a user who extracted it has them; `change`
    edits the members first."""
    if change:
        change(members)
    for name, data in members.items():
        path = Path("data") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# --- Tiny ImageNet ------------------------------------------------------------------------

SMALL = tiny_imagenet.Layout(classes=3, train_per_class=4, val_per_class=2, test=3)


def extract_tiny(monkeypatch, change=None) -> remote_data.TinyImageNet:
    """The fabricated set written to data/tiny-imagenet-200/ as a user who unzipped it has it
    (with a macOS .DS_Store or two), and its counts made the official ones."""
    monkeypatch.setattr(tiny_imagenet, "OFFICIAL", SMALL)
    fake = remote_data.tiny_imagenet()
    members = dict(fake.members)
    members["tiny-imagenet-200/.DS_Store"] = b"\0"
    members["tiny-imagenet-200/train/n01443537/images/.DS_Store"] = b"\0"
    extract_into_data(members, change)
    return fake


def test_tiny_imagenet_extracted_in_data_is_used_offline(monkeypatch, capsys):
    fake = extract_tiny(monkeypatch)
    p = offline("tiny-imagenet")
    download(p)
    assert "using data/tiny-imagenet-200 from data/" in capsys.readouterr().out
    preprocess(p)
    assert np.array_equal(load("train_images.npy"), [remote_data.decoded(d) for d, _ in fake.train])
    assert load("train_labels.npy").tolist() == [label for _, label in fake.train]
    assert np.array_equal(load("val_images.npy"), [remote_data.decoded(d) for d, _ in fake.val])
    assert np.array_equal(load("test_images.npy"), [remote_data.decoded(d) for _, d in fake.test])
    assert Path("data/tiny-imagenet-200/wnids.txt").exists()  # the user's copy stays


def _add_class(m: dict[str, bytes]) -> None:
    """The public copy's kind of difference: an extra class, its images and its val lines."""
    root = "tiny-imagenet-200/"
    m[root + "wnids.txt"] += b"n02480855\n"
    m[root + "words.txt"] += b"n02480855\torangutan\n"
    for i in range(4):
        m[root + f"train/n02480855/images/n02480855_{i}.JPEG"] = m[root + "test/images/test_0.JPEG"]
    m[root + "val/val_annotations.txt"] += b"val_6.JPEG\tn02480855\t0\t0\t1\t1\n"
    m[root + "val/images/val_6.JPEG"] = m[root + "test/images/test_0.JPEG"]


@pytest.mark.parametrize(
    "change, message",
    [
        (_add_class, r"tiny-imagenet-200/wnids\.txt: lists 4 classes, the official set 3"),
        (
            lambda m: m.pop("tiny-imagenet-200/val/images/val_4.JPEG"),
            r"tiny-imagenet-200/val/images: val_4\.JPEG missing",
        ),
        (
            lambda m: m.pop("tiny-imagenet-200/train/n02085620/images/n02085620_3.JPEG"),
            r"train/n02085620/images: n02085620_3\.JPEG missing",
        ),
        (
            lambda m: m.update({"tiny-imagenet-200/test/images/extra.JPEG": b"x"}),
            r"test/images: extra\.JPEG not in the official set",
        ),
        (
            lambda m: m.pop("tiny-imagenet-200/words.txt"),
            r"tiny-imagenet-200: words\.txt missing",
        ),
    ],
    ids=["extra-class", "missing-val-image", "missing-train-image", "extra-test-file", "no-words"],
)
def test_tiny_imagenet_extracted_copy_that_differs_is_refused(monkeypatch, change, message):
    extract_tiny(monkeypatch, change)
    with pytest.raises(NotOfficialError, match=message) as err:
        download(offline("tiny-imagenet"))
    assert "not the official Tiny ImageNet set" in str(err.value)
    assert "dataset=folder" in str(err.value) and "\n" not in str(err.value)
    assert not Path("out/raw").exists()


# --- CIFAR-10 ------------------------------------------------------------------------------


def extract_cifar(monkeypatch, change=None):
    monkeypatch.setattr(cifar10, "PER_BATCH", 5)
    archive, images, labels = remote_data.cifar10(per_batch=5)
    members = remote_data.tar_members(archive)
    extract_into_data(members, change)
    return images, labels


def test_cifar10_extracted_in_data_is_used_offline(monkeypatch):
    images, labels = extract_cifar(monkeypatch)
    p = offline("cifar10")
    download(p)
    preprocess(p)
    assert np.array_equal(load("train_images.npy"), images[:25])
    assert np.array_equal(load("val_labels.npy"), labels[25:])


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda m: m.pop("cifar-10-batches-bin/data_batch_3.bin"),
            r"cifar-10-batches-bin: data_batch_3\.bin missing",
        ),
        (
            lambda m: m.update(
                {
                    "cifar-10-batches-bin/test_batch.bin": m["cifar-10-batches-bin/test_batch.bin"][
                        :-3073
                    ]
                }
            ),
            r"test_batch\.bin: 12,292 bytes, the official batch file 15,365 \(5 records\)",
        ),
    ],
    ids=["missing-batch", "short-batch"],
)
def test_cifar10_extracted_copy_that_differs_is_refused(monkeypatch, change, message):
    extract_cifar(monkeypatch, change)
    with pytest.raises(NotOfficialError, match=message):
        download(offline("cifar10"))
    assert not Path("out/raw").exists()


# --- MNIST ---------------------------------------------------------------------------------


def extract_mnist(monkeypatch, gzipped: bool = False):
    monkeypatch.setattr(mnist, "COUNTS", {"train": 12, "t10k": 5})
    fabricated = remote_data.mnist_files()
    Path("data").mkdir()
    for name, (body, _) in fabricated.items():
        if gzipped:
            Path("data", name).write_bytes(body)
        else:
            Path("data", name.removesuffix(".gz")).write_bytes(gzip.decompress(body))
    return {name: array for name, (_, array) in fabricated.items()}


def test_mnist_uncompressed_idx_files_in_data_are_used_offline(monkeypatch):
    arrays = extract_mnist(monkeypatch)
    p = offline("mnist")
    download(p)
    assert sorted(f.name for f in Path("out/raw").iterdir())[0] == "t10k-images-idx3-ubyte"
    preprocess(p)
    assert np.array_equal(
        load("train_images.npy"), pad_and_stack(arrays["train-images-idx3-ubyte.gz"])
    )
    assert load("val_labels.npy").tolist() == list(arrays["t10k-labels-idx1-ubyte.gz"])


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("train-labels-idx1-ubyte", lambda b: b[: 4 + 4 + 11], r"19 bytes, the official file 20"),
        ("t10k-images-idx3-ubyte", lambda b: b"\0\0\x08\x01" + b[4:], r"magic number 0x00000801"),
        (
            "train-images-idx3-ubyte",
            lambda b: b[:4] + (11).to_bytes(4, "big") + b[8 : 16 + 11 * 784],
            r"holds \[11, 28, 28\], the official file \[12, 28, 28\]",
        ),
    ],
    ids=["short", "magic", "count"],
)
def test_mnist_idx_file_that_differs_is_refused(monkeypatch, name, change, message):
    extract_mnist(monkeypatch)
    path = Path("data", name)
    path.write_bytes(change(path.read_bytes()))
    with pytest.raises(NotOfficialError, match=message) as err:
        download(offline("mnist"))
    assert "not the official MNIST set" in str(err.value)


# --- ImageNet 64x64 -----------------------------------------------------------------------

SMALL64 = imagenet64.Counts(train=25, val=4, classes=1000)


def imagenet64_files(folder: Path, compress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The 11 official npz files (train batches of 2 or 3 images, 4 val images) in `folder`;
    returns every image (N, 64, 64, 3) and label (0-based), train then val."""
    rng = np.random.default_rng(0)
    save = np.savez_compressed if compress else np.savez
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for i, name in enumerate([*imagenet64.TRAIN, imagenet64.VAL]):
        n = 4 if name == imagenet64.VAL else 2 + i % 2
        x = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        y = rng.integers(1, 1001, n)  # 1..1000, as the official files
        planes = x.transpose(0, 3, 1, 2).reshape(n, -1)  # (n, 12288): R, G, B planes
        save(folder / name, data=planes, labels=y, mean=planes.mean(0))
        images.append(x)
        labels.append(y - 1)
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("form", ["npz", "npz-in-folders", "zips"])
def test_imagenet64_from_data_dir(monkeypatch, tmp_path, form):
    monkeypatch.setattr(imagenet64, "OFFICIAL", SMALL64)
    monkeypatch.setattr(imagenet64, "CHUNK", 2)  # several chunks per file
    made = tmp_path / "made"
    images, labels = imagenet64_files(made, compress=form == "zips")
    for archive, names in imagenet64.ZIPS.items():
        if form == "npz":
            for name in names:
                Path("data").mkdir(exist_ok=True)
                (made / name).rename(Path("data") / name)
        elif form == "npz-in-folders":
            folder = Path("data") / archive.removesuffix(".zip")
            folder.mkdir(parents=True)
            for name in names:
                (made / name).rename(folder / name)
        else:
            members = {name: (made / name).read_bytes() for name in names}
            Path("data").mkdir(exist_ok=True)
            Path("data", archive).write_bytes(remote_data.zip_bytes(members))
    p = offline("imagenet64")
    download(p)
    preprocess(p)
    assert np.array_equal(load("train_images.npy"), images[:25])
    assert load("train_labels.npy").tolist() == labels[:25].tolist()
    assert np.array_equal(load("val_images.npy"), images[25:])
    classes = json.loads((OUT / "classes.json").read_text())
    assert (len(classes), classes[0], classes[999]) == (1000, "kit fox", "dumbbell")


def test_imagenet64_without_its_files_says_how_to_get_them():
    with pytest.raises(PipelineError, match="no public address: log in at image-net.org"):
        download(offline("imagenet64"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d / "train_data_batch_7.npz").unlink(), "train_data_batch_7.npz missing"),
        (
            lambda d: np.savez(
                d / "val_data.npz",
                data=np.zeros((4, 12288), np.uint8),
                labels=np.array([[1]] * 4, dtype=object),
            ),
            "holds Python objects, which only a pickle loads; refusing",
        ),
        (
            lambda d: np.savez(
                d / "val_data.npz", data=np.zeros((3, 12288), np.uint8), labels=np.ones(3, int)
            ),
            "3 val images, the official set 4",
        ),
        (
            lambda d: np.savez(
                d / "val_data.npz", data=np.zeros((4, 3, 64, 64), np.uint8), labels=np.ones(4, int)
            ),
            r"`data` is uint8 \(4, 3, 64, 64\), not uint8 \(N, 12288\)",
        ),
    ],
    ids=["missing-batch", "pickled-labels", "count", "shape"],
)
def test_imagenet64_files_that_differ_are_refused(monkeypatch, change, message):
    monkeypatch.setattr(imagenet64, "OFFICIAL", SMALL64)
    imagenet64_files(Path("data"))
    change(Path("data"))
    with pytest.raises(NotOfficialError, match=message) as err:
        download(offline("imagenet64"))
    assert "not the official ImageNet 64x64 set" in str(err.value)
    assert not Path("out/raw").exists()
