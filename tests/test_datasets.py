"""Each source through the real download and preprocess stages, on archives fabricated in the
official formats and served over loopback: labels and pixels come out exactly as fabricated."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import remote_data
from helpers.fabricate import params_from
from helpers.remote_data import Route, closed_port_url, serve
from PIL import Image
from scipy import ndimage

from stages.core.errors import PipelineError
from stages.data import fetch
from stages.data import images as imaging
from stages.data.fetch import UnsafeArchiveError
from stages.data.sources import SOURCES, LayoutError, check_params
from stages.data.sources.base import pad_and_stack
from stages.data.sources.shapes import counting_set
from stages.data.writer import BadImagesError
from stages.download import download
from stages.params import ParamsError
from stages.preprocess import preprocess

OUT = Path("out/processed")
ANNOTATIONS = "tiny-imagenet-200/val/val_annotations.txt"


@pytest.fixture(autouse=True)
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fetch, "BACKOFF_S", 0.0)
    monkeypatch.setattr(imaging, "CHUNK", 4)  # tens of images still go through the pool
    return tmp_path


def use_files(monkeypatch, dataset: str, files: dict[str, bytes]) -> None:
    """Point the table's entry at fabricated files (same names, their own checksums)."""
    spec = SOURCES[dataset]
    entries = tuple(remote_data.remote(f.name, files[f.name]) for f in spec.files)
    monkeypatch.setitem(SOURCES, dataset, dataclasses.replace(spec, files=entries))


def params(dataset: str, mirror: str = "", **preprocess):
    crop = {"tiny-imagenet": 56}.get(dataset, 28)
    return params_from(
        {
            "dataset": dataset,
            "download": {"mirror": mirror, "retries": 2, "timeout": 10.0},
            "preprocess": {"workers": 2, **preprocess},
            "train": {"crop_size": crop},
        }
    )


def load(name: str) -> np.ndarray:
    return np.load(OUT / name)


def run_stages(dataset: str, files: dict[str, bytes], **options) -> list:
    routes = {f"/mirror/{name}": Route(body) for name, body in files.items()}
    with serve(routes) as srv:
        p = params(dataset, srv.base + "/mirror", **options)
        download(p)
        preprocess_result = preprocess(p)
    assert preprocess_result == OUT
    return srv.log


def test_tiny_imagenet(monkeypatch):
    fake = remote_data.tiny_imagenet()
    files = {"tiny-imagenet-200.zip": fake.archive}
    use_files(monkeypatch, "tiny-imagenet", files)
    log = run_stages("tiny-imagenet", files)
    assert [path for path, _ in log] == ["/mirror/tiny-imagenet-200.zip"]

    expect_train = np.stack([remote_data.decoded(data) for data, _ in fake.train])  # (N, 64, 64, 3)
    assert np.array_equal(load("train_images.npy"), expect_train)  # grey JPEGs -> 3 channels
    assert load("train_labels.npy").tolist() == [label for _, label in fake.train]
    assert np.array_equal(load("val_images.npy"), [remote_data.decoded(d) for d, _ in fake.val])
    assert load("val_labels.npy").tolist() == [label for _, label in fake.val]
    # The unlabelled test set is kept apart, with its file names.
    assert np.array_equal(load("test_images.npy"), [remote_data.decoded(d) for _, d in fake.test])
    assert json.loads((OUT / "test_files.json").read_text()) == [n for n, _ in fake.test]
    assert json.loads((OUT / "classes.json").read_text()) == fake.names
    info = json.loads((OUT / "info.json").read_text())
    assert (info["image_size"], info["num_classes"], info["test_count"]) == (64, 3, 3)
    assert info["skipped_images"] == 0
    assert info["wnids"] == fake.wnids  # what `convnet submit` writes
    assert not list(Path("out/raw").rglob("*.zip"))  # extracted, archive not kept in raw


def test_cifar10(monkeypatch):
    archive, images, labels = remote_data.cifar10()
    files = {"cifar-10-binary.tar.gz": archive}
    use_files(monkeypatch, "cifar10", files)
    run_stages("cifar10", files)
    assert np.array_equal(load("train_images.npy"), images[:25])
    assert np.array_equal(load("train_labels.npy"), labels[:25])
    assert np.array_equal(load("val_images.npy"), images[25:])  # official test batch
    assert np.array_equal(load("val_labels.npy"), labels[25:])
    assert json.loads((OUT / "classes.json").read_text())[9] == "truck"


def test_mnist(monkeypatch):
    fabricated = remote_data.mnist_files()
    files = {name: body for name, (body, _) in fabricated.items()}
    use_files(monkeypatch, "mnist", files)
    run_stages("mnist", files)
    assert np.array_equal(
        load("train_images.npy"), pad_and_stack(fabricated["train-images-idx3-ubyte.gz"][1])
    )
    assert load("train_labels.npy").tolist() == list(fabricated["train-labels-idx1-ubyte.gz"][1])
    assert np.array_equal(
        load("val_images.npy"), pad_and_stack(fabricated["t10k-images-idx3-ubyte.gz"][1])
    )
    assert load("val_images.npy").shape[1:] == (32, 32, 3)


def test_archive_in_data_dir_is_used_without_network(monkeypatch):
    archive, images, _ = remote_data.cifar10()
    use_files(monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": archive})
    Path("data").mkdir()
    Path("data/cifar-10-binary.tar.gz").write_bytes(archive)
    p = params("cifar10", closed_port_url())  # any network access would fail
    download(p)
    preprocess(p)
    assert np.array_equal(load("val_images.npy"), images[25:])
    assert Path("data/cifar-10-binary.tar.gz").read_bytes() == archive  # the user's file stays


def test_wrong_checksum_leaves_no_raw_output(monkeypatch):
    archive, _, _ = remote_data.cifar10()
    use_files(monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": archive})
    routes = {"/cifar-10-binary.tar.gz": Route(archive[:-10])}
    with serve(routes) as srv, pytest.raises(PipelineError, match="gave a file with md5"):
        download(params("cifar10", srv.base))
    assert not Path("out/raw").exists()
    assert not [p for p in Path("out").rglob("*") if p.is_file()]


def test_archive_with_parent_member_is_refused(monkeypatch):
    archive = remote_data.tar_gz_bytes({"cifar-10-batches-bin/x.bin": b"1", "../escape.txt": b"2"})
    use_files(monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": archive})
    refused = pytest.raises(UnsafeArchiveError, match="'../escape.txt' would be written outside")
    with serve({"/cifar-10-binary.tar.gz": Route(archive)}) as srv, refused:
        download(params("cifar10", srv.base))
    assert not Path("out/raw").exists()
    assert not list(Path(".").rglob("escape.txt"))


def test_truncated_jpeg_fails_naming_it_or_is_skipped_and_counted(monkeypatch):
    fake = remote_data.tiny_imagenet(truncate="train/n01443537/images/n01443537_1.JPEG")
    files = {"tiny-imagenet-200.zip": fake.archive}
    use_files(monkeypatch, "tiny-imagenet", files)
    with pytest.raises(BadImagesError, match=r"1 file\(s\) could not be decoded: .*n01443537_1"):
        run_stages("tiny-imagenet", files)
    assert not OUT.exists()

    run_stages("tiny-imagenet", files, skip_bad_images=True)
    info = json.loads((OUT / "info.json").read_text())
    assert info["skipped_images"] == 1
    assert info["train_count"] == len(fake.train) - 1
    assert "n01443537_1.JPEG" in (OUT / "skipped.txt").read_text()
    kept = [pair for i, pair in enumerate(fake.train) if i != 1]  # sorted order: index 1 is cut
    assert np.array_equal(load("train_images.npy"), [remote_data.decoded(d) for d, _ in kept])
    assert load("train_labels.npy").tolist() == [label for _, label in kept]


def _tiny_with(monkeypatch, change):
    fake = remote_data.tiny_imagenet()
    members = dict(fake.members)
    change(members)
    files = {"tiny-imagenet-200.zip": remote_data.zip_bytes(members)}
    use_files(monkeypatch, "tiny-imagenet", files)
    return files


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("tiny-imagenet-200/wnids.txt"), r"wnids\.txt: file missing"),
        (
            lambda m: m.update({ANNOTATIONS: b"val_0.JPEG\tn07777777\t0\t0\t1\t1\n"}),
            r"val_annotations\.txt:1: class 'n07777777' of val_0\.JPEG is not in wnids\.txt",
        ),
        (
            lambda m: [m.pop(k) for k in list(m) if "/train/n09999999/images/" in k],
            r"train/n09999999/images: folder missing",
        ),
        (  # names read from the files stay in their folders: nothing is read from outside
            lambda m: m.update({ANNOTATIONS: b"../../../../etc/hostname\tn01443537\t0\t0\t1\t1\n"}),
            r"val_annotations\.txt:1: '\.\./\.\./\.\./\.\./etc/hostname' is not a plain file name",
        ),
        (
            lambda m: m.update({"tiny-imagenet-200/wnids.txt": b"n01443537\n../../../../etc\n"}),
            r"wnids\.txt: '\.\./\.\./\.\./\.\./etc' is not a plain file name",
        ),
    ],
    ids=["no-wnids", "unknown-val-class", "empty-class", "val-name-outside", "wnid-outside"],
)
def test_tiny_imagenet_layout_errors_name_the_file(monkeypatch, change, message):
    files = _tiny_with(monkeypatch, change)
    with pytest.raises(LayoutError, match=message):
        run_stages("tiny-imagenet", files)
    assert not OUT.exists()


def test_folder_of_mixed_formats_and_sizes():
    colours = {"cats": (200, 30, 40), "kittens": (20, 180, 60), "paintings": (10, 20, 230)}
    modes = [("a.png", (50, 40), "RGB"), ("b.jpg", (64, 64), "RGB"), ("c.webp", (16, 48), "RGB")]
    modes += [("d.png", (33, 20), "RGBA"), ("e.png", (40, 40), "P"), ("f.JPEG", (90, 30), "RGB")]
    for cls, colour in colours.items():
        folder = Path("data/pics") / cls
        folder.mkdir(parents=True)
        for name, size, mode in modes:
            img = Image.new("RGB", size, colour)
            # An adaptive palette holds the colour exactly (the default web palette dithers).
            img = img.convert(mode, palette=Image.ADAPTIVE) if mode == "P" else img.convert(mode)
            kwargs = {"lossless": True} if name.endswith("webp") else {}
            img.save(folder / name, **kwargs)
        (folder / "notes.txt").write_text("not an image")  # ignored by extension
    p = params_from(
        {
            "dataset": "folder",
            "download": {"folder": "pics"},
            "preprocess": {"image_size": 24, "workers": 2, "val_fraction": 0.5},
            "train": {"crop_size": 20},
        }
    )
    download(p)
    preprocess(p)
    images = np.concatenate([load("train_images.npy"), load("val_images.npy")])
    labels = np.concatenate([load("train_labels.npy"), load("val_labels.npy")])
    assert images.shape == (18, 24, 24, 3)
    assert np.bincount(labels).tolist() == [6, 6, 6]  # every format read, notes.txt ignored
    assert np.bincount(load("val_labels.npy")).tolist() == [3, 3, 3]  # stratified split
    for image, label in zip(images, labels, strict=True):
        colour = list(colours.values())[label]
        # Solid colours survive any resize/crop; JPEG may move a value by a few levels.
        assert np.abs(image.astype(int) - colour).max() <= 3
    assert json.loads((OUT / "classes.json").read_text()) == list(colours)


def test_folder_centre_crop_keeps_the_middle():
    for cls in ("a", "b"):
        Path(f"data/images/{cls}").mkdir(parents=True)
        for i in range(2):
            wide = np.zeros((20, 60, 3), dtype=np.uint8)  # (H, W, 3): blue sides, red middle
            wide[..., 2] = 255
            wide[:, 20:40] = (255, 0, 0)
            Image.fromarray(wide).save(f"data/images/{cls}/{i}.png")
    p = params_from(
        {
            "dataset": "folder",
            "preprocess": {"image_size": 10, "val_fraction": 0.5},
            "train": {"crop_size": 8},
        }
    )
    download(p)
    preprocess(p)
    image = load("train_images.npy")[0]  # 60x20 -> 30x10 -> centre 10x10 = the red band
    assert (image[:, 2:8] == (255, 0, 0)).all()


def test_hidden_files_and_folders_are_skipped_at_any_depth():
    """One rule: a name starting with `.` is hidden, a file or a folder, at any depth. Nothing
    hidden is copied to out/raw or trained on: not .DS_Store, not macOS's ._0.png (not even an
    image), not the images in a class's .thumbnails/ nor a hidden class folder."""
    for cls, colour in (("a", (250, 0, 0)), ("b", (0, 0, 250))):
        folder = Path(f"data/images/{cls}")
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (12, 12), colour).save(folder / f"{i}.png")
        (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (folder / "._0.png").write_bytes(b"\0\x05\x16\x07 AppleDouble")
        (folder / ".thumbnails").mkdir()
        Image.new("RGB", (12, 12), (0, 250, 0)).save(folder / ".thumbnails/0.png")
    Path("data/images/.cache").mkdir()
    Image.new("RGB", (12, 12), (0, 250, 0)).save("data/images/.cache/0.png")
    p = params_from(
        {
            "dataset": "folder",
            "preprocess": {"image_size": 10, "val_fraction": 0.5},
            "train": {"crop_size": 8},
        }
    )
    download(p)
    copied = sorted(str(f.relative_to("out/raw")) for f in Path("out/raw").rglob("*"))
    assert copied == ["folder", "folder/a", "folder/a/0.png", "folder/a/1.png", "folder/b",
                      "folder/b/0.png", "folder/b/1.png"]  # fmt: skip
    preprocess(p)
    images = np.concatenate([load("train_images.npy"), load("val_images.npy")])
    assert len(images) == 4 and not (images[..., 1] > 100).any()  # no green thumbnail
    assert json.loads((OUT / "classes.json").read_text()) == ["a", "b"]


def test_folder_missing_or_with_an_empty_class_fails_naming_it():
    p = params_from({"dataset": "folder"})
    with pytest.raises(PipelineError, match="data/images: not found; put your images in"):
        download(p)
    Path("data/images/a").mkdir(parents=True)
    Path("data/images/b").mkdir()
    Image.new("RGB", (8, 8)).save("data/images/a/x.png")
    download(p)
    with pytest.raises(LayoutError, match="folder/b: class folder has no images"):
        preprocess(p)


def test_shapes_counts_and_determinism():
    counts = range(1, 6)
    images, labels = counting_set(counts, 20, 32, 2, 4, seed=7)
    assert images.shape == (100, 32, 32, 3) and images.dtype == np.uint8
    for image, label in zip(images, labels, strict=True):
        _, n = ndimage.label(image.any(axis=-1))
        assert n == counts[label]
    again, _ = counting_set(counts, 20, 32, 2, 4, seed=7)
    assert images.tobytes() == again.tobytes()
    other, _ = counting_set(counts, 20, 32, 2, 4, seed=8)
    assert images.tobytes() != other.tobytes()


def test_shapes_many_circles_through_the_stages():
    shapes = {"min_count": 45, "max_count": 47, "per_class": 4, "min_radius": 1, "max_radius": 1}
    p = params_from(
        {
            "dataset": "shapes",
            "seed": 3,
            "preprocess": {"image_size": 64, "shapes": shapes, "val_fraction": 0.5},
            "train": {"crop_size": 56},
        }
    )
    download(p)
    preprocess(p)
    first = load("train_images.npy").tobytes()
    for split in ("train", "val"):
        for image, label in zip(
            load(f"{split}_images.npy"), load(f"{split}_labels.npy"), strict=True
        ):
            assert ndimage.label(image.any(axis=-1))[1] == 45 + label
    assert json.loads((OUT / "classes.json").read_text()) == ["45", "46", "47"]
    preprocess(p)
    assert load("train_images.npy").tobytes() == first  # same seed, same bytes


def test_crop_size_checked_against_preprocess_image_size():
    with pytest.raises(ParamsError, match="train.crop_size: is 40 but shapes images are 32x32"):
        check_params(params_from({"dataset": "shapes", "train": {"crop_size": 40}}))
    p = params_from(
        {"dataset": "folder", "preprocess": {"image_size": 48}, "train": {"crop_size": 40}}
    )
    check_params(p)
    assert p.train.crop_size == 40
    with pytest.raises(ParamsError, match="preprocess.shapes: 50 circles of radius 5 do not fit"):
        check_params(
            params_from(
                {"dataset": "shapes", "preprocess": {"shapes": {"max_count": 50, "max_radius": 5}}}
            )
        )


def test_a_file_that_is_not_an_image_is_named_with_a_plain_reason(tmp_path):
    good, junk = tmp_path / "good.png", tmp_path / "junk.png"
    Image.new("RGB", (8, 8), "red").save(good)
    junk.write_text("not an image")
    [(start, images, bad)] = imaging.decode_blocks([good, junk], 8, fit=True, workers=1)
    assert start == 0 and images.shape == (2, 8, 8, 3) and not images[1].any()  # junk: zeros
    assert bad == [(1, "not an image file PIL can read")]
