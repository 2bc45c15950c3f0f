"""The served model's memory under concurrent large images: peak and settled resident memory.

    python benchmarks/serve_memory.py [--requests 20] [--side 9400] [--timeout 600] [--stop-at 10]

Saves a small fabricated classifier as the MLflow model a training logs, serves it with
`mlflow models serve --env-manager local --workers 1` on 127.0.0.1, makes one PNG of --side x
--side pixels (one colour: about 280 KB for 9400, under Pillow's 89.5 M pixel limit) and sends it
in --requests concurrent requests, one image each. Prints the answers' HTTP statuses, the time
they took, the server process's peak resident memory (VmHWM) and its resident memory once it has
gone quiet (VmRSS: no CPU used for 2 s; MLflow answers 504 past its request timeout, --timeout,
but the request's work goes on). The server is killed, and the run reported as stopped, if its
resident memory passes --stop-at GiB (a guard for a shared machine). Extra environment for the
server: --env NAME=VALUE (repeatable).

    python benchmarks/serve_memory.py --modes [--side 4000]

instead prints what decoding one image costs in this process, per mode of the file: the peak
resident memory over the process's before it, per decoded pixel (one-colour images of --side
x --side; a PNG, a TIFF for CMYK).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import ctypes
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's stages/
sys.path.insert(0, str(REPO / "tests"))  # the tests' fabricated checkpoint
from helpers import fabricate  # noqa: E402

from stages.core import checkpoint  # noqa: E402
from stages.engine import serving  # noqa: E402

GiB = 2**30


def save_model(folder: Path) -> Path:
    """The fabricated alexnet checkpoint saved as the pyfunc model a training logs."""
    ckpt = folder / "model.pt"
    fabricate.save_checkpoint(ckpt, fabricate.model())
    args = serving.package(ckpt, checkpoint.load(ckpt))
    del args["flavor"]
    mlflow.pyfunc.save_model(folder / "model", **args)
    return folder / "model"


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of process `pid`, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def server_pid(parent: int) -> int | None:
    """The uvicorn process that `mlflow models serve` (process `parent`) started."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"uvicorn" in (entry / "cmdline").read_bytes():
                return int(entry.name)
    return None


MODES = {  # mode: (colour, format, save options)
    "RGB": ((10, 200, 30), "PNG", {}),
    "L": (80, "PNG", {}),
    "P": (5, "PNG", {}),
    "P, transparent": (3, "PNG", {"transparency": 3}),
    "RGBA": ((10, 20, 30, 128), "PNG", {}),
    "LA": ((50, 100), "PNG", {}),
    "I;16": (4000, "PNG", {}),
    "CMYK": ((1, 2, 3, 4), "TIFF", {"compression": "tiff_deflate"}),
}


def per_mode(side: int) -> None:
    """Peak resident memory of decode_image per decoded pixel, for each of MODES."""
    from stages.data.images import decode_image

    for name, (colour, fmt, options) in MODES.items():
        buffer = io.BytesIO()
        Image.new(name.split(",")[0], (side, side), colour).save(buffer, fmt, **options)
        data = buffer.getvalue()
        del buffer
        ctypes.CDLL(None).malloc_trim(0)  # what was freed, handed back: not reused unseen
        Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
        before = memory(os.getpid())["VmRSS"]
        decode_image(data, 32)
        peak = memory(os.getpid())["VmHWM"] - before
        print(f"{name:15} {len(data) / 1000:6.0f} KB  peak {peak / side**2:5.1f} bytes a pixel")


def post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:  # the server was stopped by the guard
        return 0, str(err)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--side", type=int, default=9400)
    ap.add_argument("--timeout", type=int, default=600, help="mlflow models serve -t (s)")
    ap.add_argument("--stop-at", type=float, default=10.0, help="GiB: kill the server past it")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    ap.add_argument("--modes", action="store_true", help="what decoding costs, per mode")
    args = ap.parse_args()
    if args.modes:
        return per_mode(args.side if args.side != 9400 else 4000)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_model(root)
        buffer = io.BytesIO()
        Image.new("RGB", (args.side, args.side), (200, 120, 40)).save(buffer, format="PNG")
        png = buffer.getvalue()
        body = json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}}
        ).encode()
        del buffer

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        exe = Path(sys.executable).with_name("mlflow")
        env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true")
        env["PATH"] = f"{exe.parent}{os.pathsep}{env['PATH']}"  # its uvicorn
        env.update(item.split("=", 1) for item in args.env)
        cmd = [str(exe), "models", "serve", "-m", str(model), "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--timeout", str(args.timeout)]  # fmt: skip
        log = open(root / "serve.log", "wb")  # noqa: SIM115 - closed with the server
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            ping = f"http://127.0.0.1:{port}/ping"
            while True:
                with contextlib.suppress(OSError), urllib.request.urlopen(ping, timeout=5):
                    break
                if proc.poll() is not None:
                    raise SystemExit((root / "serve.log").read_text()[-3000:])
                time.sleep(0.5)
            pid = server_pid(proc.pid)
            idle = memory(pid)["VmRSS"]
            url = f"http://127.0.0.1:{port}/invocations"
            stopped = False

            def guard(seconds: float) -> None:
                nonlocal stopped
                end = time.monotonic() + seconds
                while not stopped and time.monotonic() < end:
                    if memory(pid)["VmRSS"] > args.stop_at * GiB:
                        stopped = True
                        os.killpg(proc.pid, signal.SIGKILL)
                    time.sleep(0.05)

            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
                futures = [pool.submit(post, url, body) for _ in range(args.requests)]
                while not stopped and not all(f.done() for f in futures):
                    guard(0.5)
                answers = [f.result() for f in futures]
            seconds = time.perf_counter() - start
            while not stopped:  # until the server has gone quiet
                used = cpu_seconds(pid)
                guard(2)
                if not stopped and cpu_seconds(pid) - used < 0.1:
                    break
            if not stopped:
                after = memory(pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            log.close()

    statuses: dict[int, int] = {}
    for status, _ in answers:
        statuses[status] = statuses.get(status, 0) + 1
    print(f"{args.requests} concurrent requests, one {args.side}x{args.side} PNG"
          f" ({len(png) / 1000:.0f} KB) each; server env: {' '.join(args.env) or '-'}")  # fmt: skip
    print(f"answers: {statuses} in {seconds:.1f} s (request timeout {args.timeout} s);"
          f" idle server {idle / GiB:.2f} GiB")  # fmt: skip
    for status, text in answers:
        if status != 200:
            print(f"  e.g. HTTP {status}: {text[-300:]}")
            break
    if stopped:
        print(f"STOPPED: the server passed {args.stop_at} GiB resident; killed")
    else:
        print(f"server peak resident (VmHWM): {after['VmHWM'] / GiB:.2f} GiB;"
              f" resident once quiet: {after['VmRSS'] / GiB:.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
