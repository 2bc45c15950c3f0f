"""The downloader against a loopback server: verify, resume, retry, refuse, leave nothing half."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers.fabricate import full_params
from helpers.remote_data import Route, closed_port_url, remote, serve, tar_gz_bytes, zip_bytes
from typer.testing import CliRunner

from stages.cli import app
from stages.data import fetch
from stages.data.fetch import FetchError, UnsafeArchiveError, extract
from stages.params import yaml_text

BODY = bytes(range(256)) * 400  # 100 KiB, several read chunks when CHUNK is small
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(fetch, "BACKOFF_S", 0.0)
    monkeypatch.setattr(fetch, "CHUNK", 4096)


def files_in(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_fetch_verifies_and_renames(tmp_path):
    with serve({"/a.bin": Route(BODY)}) as srv:
        path = fetch.fetch(
            remote("a.bin", BODY),
            tmp_path / "dl",
            data_dir=tmp_path / "data",
            mirror=srv.base + "/",
        )
    assert path == tmp_path / "dl" / "a.bin"
    assert path.read_bytes() == BODY
    assert files_in(tmp_path / "dl") == ["a.bin"]


def test_dropped_connection_resumes_with_range(tmp_path):
    routes = {"/a.bin": Route(BODY, drop_first=1)}
    with serve(routes) as srv:
        path = fetch.fetch(
            remote("a.bin", BODY), tmp_path, data_dir=tmp_path / "data", mirror=srv.base
        )
    assert path.read_bytes() == BODY
    (first, r1), (second, r2) = srv.log
    assert r1 is None and r2 == f"bytes={len(BODY) // 2}-"  # resumed where the drop left off
    assert files_in(tmp_path) == ["a.bin"]


def test_dropped_connection_without_range_support_restarts(tmp_path):
    with serve({"/a.bin": Route(BODY, drop_first=1, ranges=False)}) as srv:
        path = fetch.fetch(
            remote("a.bin", BODY), tmp_path, data_dir=tmp_path / "d", mirror=srv.base
        )
    assert path.read_bytes() == BODY  # a 200 to a Range request rewrites from byte 0


def test_5xx_is_retried(tmp_path):
    with serve({"/a.bin": Route(BODY, fail_first=2)}) as srv:
        path = fetch.fetch(
            remote("a.bin", BODY), tmp_path, data_dir=tmp_path / "d", mirror=srv.base, retries=3
        )
    assert path.read_bytes() == BODY
    assert len(srv.log) == 3


def test_wrong_checksum_deletes_and_names_address_and_digest(tmp_path):
    wrong = BODY[:-1] + b"x"
    with serve({"/a.bin": Route(wrong)}) as srv, pytest.raises(FetchError) as err:
        fetch.fetch(
            remote("a.bin", BODY), tmp_path / "dl", data_dir=tmp_path / "d", mirror=srv.base
        )
    message = str(err.value)
    assert f"{srv.base}/a.bin gave a file with md5 {hashlib.md5(wrong).hexdigest()}" in message
    assert hashlib.md5(BODY).hexdigest() in message
    assert files_in(tmp_path / "dl") == []


def test_404_is_a_clear_error_and_leaves_nothing(tmp_path):
    with serve({}) as srv, pytest.raises(FetchError, match=r"/a.bin: HTTP 404") as err:
        fetch.fetch(
            remote("a.bin", BODY), tmp_path / "dl", data_dir=tmp_path / "d", mirror=srv.base
        )
    assert "no network" not in str(err.value)
    assert len(srv.log) == 1  # a 404 is not retried
    assert files_in(tmp_path / "dl") == []


def test_official_addresses_are_tried_in_order(tmp_path):
    with serve({"/second/a.bin": Route(BODY)}) as srv:
        entry = remote("a.bin", BODY)
        entry = type(entry)(
            "a.bin",
            (f"{srv.base}/first/a.bin", f"{srv.base}/second/a.bin"),
            entry.digest,
            entry.size,
        )
        path = fetch.fetch(entry, tmp_path, data_dir=tmp_path / "d")
    assert path.read_bytes() == BODY
    assert [p for p, _ in srv.log] == ["/first/a.bin", "/second/a.bin"]


def test_no_network_says_where_to_put_the_file(tmp_path):
    with pytest.raises(FetchError) as err:
        fetch.fetch(
            remote("a.bin", BODY),
            tmp_path / "dl",
            data_dir=tmp_path / "data",
            mirror=closed_port_url(),
            retries=2,
        )
    message = str(err.value)
    assert message.startswith("no network")
    assert f"put it at {tmp_path / 'data' / 'a.bin'}" in message
    assert "http://example.invalid/a.bin" in message  # the official address to fetch by hand
    assert files_in(tmp_path / "dl") == []


def test_file_in_data_dir_is_used_without_network(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.bin").write_bytes(BODY)
    path = fetch.fetch(
        remote("a.bin", BODY), tmp_path / "dl", data_dir=tmp_path / "data", mirror=closed_port_url()
    )
    assert path == tmp_path / "data" / "a.bin"


def test_damaged_file_in_data_dir_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.bin").write_bytes(BODY[:100])
    with pytest.raises(FetchError, match=r"a.bin: md5 is [0-9a-f]{32}, expected"):
        fetch.fetch(remote("a.bin", BODY), tmp_path / "dl", data_dir=tmp_path / "data")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
@pytest.mark.parametrize("bad", ["../evil.txt", "ok/../../evil.txt", "/abs/evil.txt"])
def test_extract_refuses_members_leaving_the_target(tmp_path, kind, bad):
    members = {"good/file.txt": b"fine", bad: b"pwned"}
    data = zip_bytes(members) if kind == "zip" else tar_gz_bytes(members)
    archive = tmp_path / f"a.{kind}"
    archive.write_bytes(data)
    target = tmp_path / "deep" / "target"
    with pytest.raises(UnsafeArchiveError, match="would be written outside") as err:
        extract(archive, target)
    assert repr(bad) in str(err.value)
    assert files_in(target) == []  # checked before anything is written
    assert not list(tmp_path.rglob("evil.txt"))


def test_extract_refuses_a_tar_link_pointing_outside(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        link = tarfile.TarInfo("inside/link")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tf.addfile(link)
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match="'inside/link' is unsafe"):
        extract(archive, tmp_path / "t")


def test_extract_refuses_a_zip_symlink(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    archive = tmp_path / "a.zip"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match="'link' is a symbolic link"):
        extract(archive, tmp_path / "t")


def test_cli_turns_a_download_error_into_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    partial = {"download": {"mirror": closed_port_url(), "retries": 1}}
    (tmp_path / "params.yaml").write_text(yaml_text(full_params(partial, "dataset=mnist")))
    result = CliRunner().invoke(app, ["download"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no network" in lines[0]
    assert "data/train-images-idx3-ubyte.gz" in lines[0]
    assert not (tmp_path / "out" / "raw").exists()


# fetch() in a process whose file-size limit (`ulimit -f`) is 10 KiB: what it raises.
LIMITED = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_FSIZE, (10240, 10240))
from stages.data import fetch
from helpers.remote_data import remote
fetch.CHUNK = 4096
try:
    folder = Path(sys.argv[2])
    fetch.fetch(remote("a.bin", bytes(range(256)) * 400), folder, data_dir=folder,
                mirror=sys.argv[1], retries=3)
except Exception as err:
    print(type(err).__name__, err)
"""


def test_a_file_size_limit_is_not_taken_for_a_dropped_connection(tmp_path):
    """Writing past `ulimit -f` is the disk's doing: one line naming the file and the limit,
    no retries of the address, nothing left behind."""
    with serve({"/a.bin": Route(BODY)}) as srv:
        result = subprocess.run(
            [sys.executable, "-c", LIMITED, srv.base, str(tmp_path)], capture_output=True,
            text=True, timeout=120, env=dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}"),
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"NotWrittenError {tmp_path}/a.bin.part: would grow past the file-size limit of this"
        " process (`ulimit -f`: 10.0 KiB)"
    ), result.stdout
    assert len(srv.log) == 1  # not retried
    assert files_in(tmp_path) == []
