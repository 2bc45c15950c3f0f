"""The datasets the pipeline knows: one table, read by params validation, download, preprocess.

Official addresses carry the checksums their publishers give (or, where none is published, the
one every mirror and loader agrees on) and the exact size in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: its name (also the name looked for in `download.data_dir`)."""

    name: str
    urls: tuple[str, ...]  # tried in order; `download.mirror` replaces them all with mirror/name
    digest: str  # "md5:<hex>" or "sha256:<hex>"
    size: int  # bytes, for the progress bar and the README

    @property
    def algorithm(self) -> str:
        return self.digest.split(":", 1)[0]

    @property
    def hexdigest(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    image_size: int | None  # side of the square uint8 images; None: from preprocess.image_size
    embedded: bool  # True: generated or shipped locally, never touches the network
    description: str
    files: tuple[RemoteFile, ...] = ()  # what download fetches (empty for embedded/local sets)


# MNIST's own site (yann.lecun.com) now often refuses plain downloads; the copies below are the
# ones torchvision and TensorFlow use, byte-identical (same md5).
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


def _mnist(name: str, md5: str, size: int) -> RemoteFile:
    return RemoteFile(name, tuple(m + name for m in _MNIST_MIRRORS), f"md5:{md5}", size)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "digits",
            image_size=32,
            embedded=True,
            description="scikit-learn's 1,797 handwritten 8x8 digits, MNIST-style 32x32x3",
        ),
        DatasetSpec(
            "tiny-imagenet",
            image_size=64,
            embedded=False,
            description="Tiny ImageNet: 200 classes, 100,000 train + 10,000 val (+10,000"
            " unlabelled test) 64x64 JPEGs",
            files=(
                RemoteFile(
                    "tiny-imagenet-200.zip",
                    ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
                    # Stanford publishes no checksum; this md5 is the one loaders agree on.
                    "md5:90528d7ca1a48142e341f4ef8d21d0de",
                    248_100_043,
                ),
            ),
        ),
        DatasetSpec(
            "cifar10",
            image_size=32,
            embedded=False,
            description="CIFAR-10: 10 classes, 50,000 train + 10,000 test 32x32 colour images",
            files=(
                # The binary version: raw bytes. The Python version's batches are pickles, and
                # unpickling a downloaded file runs whatever code it carries.
                RemoteFile(
                    "cifar-10-binary.tar.gz",
                    ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
                    "md5:c32a1d4ab5d03f1284b67883e8d87530",  # published on the CIFAR page
                    170_052_171,
                ),
            ),
        ),
        DatasetSpec(
            "mnist",
            image_size=32,
            embedded=False,
            description="MNIST: 60,000 train + 10,000 test handwritten digits, 28x28 padded"
            " to 32x32x3",
            files=(
                _mnist("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 9_912_422),
                _mnist("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28_881),
                _mnist("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1_648_877),
                _mnist("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4_542),
            ),
        ),
        DatasetSpec(
            "folder",
            image_size=None,
            embedded=True,
            description="your own images: data/<download.folder>/<class>/*.{jpg,png,webp,...}",
        ),
        DatasetSpec(
            "shapes",
            image_size=None,
            embedded=True,
            description="synthetic counting set: N filled circles per image, class = N",
        ),
    ]
}
