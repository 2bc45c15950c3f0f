"""Test helpers: a loopback HTTP server and small archives in each dataset's official format."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from stages.data.sources import RemoteFile

from .processes import free_port


@dataclass
class Route:
    body: bytes
    drop_first: int = 0  # first N requests: send half the body, then close the connection
    fail_first: int = 0  # first N requests: answer 503
    ranges: bool = True  # honour Range requests with 206


@dataclass
class Server:
    base: str
    routes: dict[str, Route]
    log: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        state = self.server.state  # type: ignore[attr-defined]
        state.log.append((self.path, self.headers.get("Range")))
        route = state.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        if route.fail_first:
            route.fail_first -= 1
            self.send_error(503, "Service Unavailable")
            return
        body, start = route.body, 0
        rng = self.headers.get("Range")
        if rng and route.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if route.drop_first:
            route.drop_first -= 1
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the client sees a short read
            return
        self.wfile.write(body[start:])


@contextlib.contextmanager
def serve(routes: dict[str, Route]) -> Iterator[Server]:
    """Serve `routes` on 127.0.0.1 (a free port) in a thread; stopped on exit."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.timeout = 5
    state = Server(f"http://127.0.0.1:{httpd.server_address[1]}", routes)
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def closed_port_url() -> str:
    """An address on 127.0.0.1 where nothing listens: what 'no network' looks like."""
    return f"http://127.0.0.1:{free_port()}"


def remote(name: str, body: bytes, url: str = "http://example.invalid/") -> RemoteFile:
    """A table entry whose checksum matches `body`."""
    return RemoteFile(name, (url + name,), f"md5:{hashlib.md5(body).hexdigest()}", len(body))


# --- images -------------------------------------------------------------------------------


def jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """(H, W, 3) or (H, W) uint8 -> JPEG bytes (RGB or grayscale)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """What any correct decoder gives for these bytes, as (H, W, 3) uint8."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class TinyImageNet:
    """A tiny-imagenet-200.zip with a few classes; what preprocess should produce from it."""

    archive: bytes
    members: dict[str, bytes]
    wnids: list[str]  # sorted: the class order
    names: list[str]
    train: list[tuple[bytes, int]]  # (jpeg, label) in the order preprocess writes them
    val: list[tuple[bytes, int]]
    test: list[tuple[str, bytes]]


def tiny_imagenet(
    seed: int = 0, per_class: int = 4, val: int = 6, test: int = 3, truncate: str = ""
) -> TinyImageNet:
    """Official layout; every third image is grayscale. `truncate`: a member to cut short."""
    rng = np.random.default_rng(seed)
    wnids = ["n02085620", "n01443537", "n09999999"]  # not sorted, like the real wnids.txt
    words = {
        "n01443537": "goldfish, Carassius auratus",
        "n02085620": "Chihuahua",
        "n09999999": "test class, other name",
        "n00000001": "an ImageNet class not in this set",
    }
    order = sorted(wnids)
    counter = iter(range(10_000))

    def image() -> bytes:
        shape = (64, 64) if next(counter) % 3 == 0 else (64, 64, 3)
        return jpeg(rng.integers(0, 256, shape, dtype=np.uint8))

    root = "tiny-imagenet-200/"
    m: dict[str, bytes] = {
        root + "wnids.txt": "".join(w + "\n" for w in wnids).encode(),
        root + "words.txt": "".join(f"{k}\t{v}\n" for k, v in words.items()).encode(),
    }
    train = []
    for w in order:
        m[root + f"train/{w}/{w}_boxes.txt"] = b""
        for i in range(per_class):
            data = image()
            m[root + f"train/{w}/images/{w}_{i}.JPEG"] = data
            train.append((data, order.index(w)))
    vals, lines = [], []
    for i in range(val):
        w = wnids[i % len(wnids)]
        data = image()
        m[root + f"val/images/val_{i}.JPEG"] = data
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63\n")
        vals.append((data, order.index(w)))
    m[root + "val/val_annotations.txt"] = "".join(lines).encode()
    tests = []
    for i in range(test):
        data = image()
        m[root + f"test/images/test_{i}.JPEG"] = data
        tests.append((f"test_{i}.JPEG", data))
    if truncate:
        m[root + truncate] = m[root + truncate][: len(m[root + truncate]) // 2]
    return TinyImageNet(
        zip_bytes(m),
        m,
        order,
        [words[w].split(",")[0] for w in order],
        train,
        vals,
        tests,
    )


def cifar10(seed: int = 0, per_batch: int = 5) -> tuple[bytes, np.ndarray, np.ndarray]:
    """cifar-10-binary.tar.gz; returns (archive, images (N, 32, 32, 3), labels) train+test."""
    rng = np.random.default_rng(seed)
    n = per_batch * 6
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    root = "cifar-10-batches-bin/"
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    m = {root + "batches.meta.txt": ("\n".join(names) + "\n\n").encode()}
    for b in range(6):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        planes = images[sl].transpose(0, 3, 1, 2).reshape(per_batch, -1)  # (n, 3072) R, G, B
        records = np.concatenate([labels[sl, None], planes], axis=1)  # (n, 3073)
        name = f"data_batch_{b + 1}.bin" if b < 5 else "test_batch.bin"
        m[root + name] = records.tobytes()
    return tar_gz_bytes(m), images, labels.astype(np.int64)


def mnist_files(seed: int = 0, train: int = 12, test: int = 5) -> dict[str, tuple[bytes, object]]:
    """The four gzipped idx files: name -> (bytes, the array they hold)."""
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        head = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        out[f"{prefix}-images-idx3-ubyte.gz"] = (gzip.compress(head + images.tobytes()), images)
        head = (0x801).to_bytes(4, "big") + n.to_bytes(4, "big")
        out[f"{prefix}-labels-idx1-ubyte.gz"] = (gzip.compress(head + labels.tobytes()), labels)
    return out


def tar_members(archive: bytes) -> dict[str, bytes]:
    """name -> bytes of every file in a .tar.gz (what extracting it gives)."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
