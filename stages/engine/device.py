"""Which device a stage runs on, and the speed settings (precision, memory format, compile).

Each setting resolves once per run into `Speed`; a setting the device cannot use is skipped
with the reason printed, never silently.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

from stages.core.errors import PipelineError
from stages.core.files import atomic_path

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(PipelineError):
    """A device name that is malformed or names a device this machine does not have."""


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" -> the first GPU if there is one, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # "gpu", "cuda:7x": torch's own parser refuses it
        device = None
    if (
        device is None
        or device.type not in ("cpu", "cuda")
        or (":" in name) != (device.index is not None)
    ):
        raise DeviceError(
            f"device {name!r}: must be one of auto, cpu, cuda, cuda:N (N a GPU number)"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r}: no CUDA GPU is visible; use auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(
            f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s),"
            f" cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device


@dataclass(frozen=True)
class Speed:
    """Resolved speed settings for one device."""

    device: torch.device
    dtype: torch.dtype | None = None  # autocast dtype; None = plain fp32
    channels_last: bool = False
    compile: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to `dtype` on this device (a no-op context for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, 3, H, W) batch in the model's memory format (a no-op when it already is)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def label(self) -> str:
        """ "bf16/channels_last": how notes and the speed cache name it."""
        return f"{self.precision}/{self.memory_format}"


# The CPU flags with which oneDNN runs bf16 convolutions and matmuls in hardware (AVX512-BF16,
# AMX). Without them bf16 is emulated: 0.08-0.10x fp32 on an AVX2-only CPU (BENCHMARKS.md).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# Measured is at least this much faster than the first candidate, or the first is kept: the
# measurement takes a few steps, and noise of a few percent must not flip the choice.
MARGIN = 1.05


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (`lscpu`'s Flags); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+"), or "unknown"."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return "unknown"


def bf16_in_hardware(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a GPU that supports it, a CPU with
    AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & BF16_FLAGS)


Measure = Callable[[list["Speed"]], dict["Speed", float]]


def resolve_speed(
    device: torch.device,
    precision: str = "auto",
    memory_format: str = "auto",
    compile: bool = False,
    cudnn_benchmark: bool = True,
    has_conv: bool = True,
    measure: Measure | None = None,
) -> tuple[Speed, list[str]]:
    """Speed settings for `device` from params.yaml values, plus one note per decision.

    `auto` takes what the device can do: on a GPU bf16 where it has it and channels_last for conv
    nets. On a CPU what pays depends on the CPU and the model (channels_last ran resnet18 1.1x
    faster and resnet50 10x slower on one AVX2 CPU; bf16 1.5x faster with AMX, 10x slower
    without): fp32 without bf16 hardware, and where more than one candidate remains, `measure`
    (images/s of a few training steps of each) picks. Without `measure` the first is taken.
    """
    notes: list[str] = []
    cuda = device.type == "cuda"
    if precision == "fp16" and not cuda:
        notes.append("precision fp16 skipped: CPU autocast fp16 has no speed benefit; using fp32")
        precision = "fp32"
    if memory_format == "channels_last" and not has_conv:
        notes.append("memory_format channels_last skipped: the model has no convolutions")
        memory_format = "contiguous"
    dtypes = (
        [precision] if precision != "auto"
        else ["bf16"] if cuda and bf16_in_hardware(device)
        else ["fp32", "bf16"] if bf16_in_hardware(device)
        else ["fp32"]
    )  # fmt: skip
    formats = (
        [memory_format] if memory_format != "auto"
        else ["contiguous"] if not has_conv
        else ["channels_last"] if cuda
        else ["channels_last", "contiguous"]
    )  # fmt: skip
    if compile and not cuda and shutil.which("c++") is None and shutil.which("g++") is None:
        notes.append("compile skipped: torch.compile on the CPU needs a C++ compiler (none found)")
        compile = False
    candidates = [
        Speed(device, DTYPES[d], f == "channels_last", compile) for d in dtypes for f in formats
    ]
    speed = candidates[0]
    if len(candidates) > 1 and measure is not None:
        rates = measure(candidates)
        best = max(candidates, key=lambda s: rates[s])
        speed = best if rates[best] >= MARGIN * rates[speed] else speed
        shown = ", ".join(f"{s.label} {rates[s]:.0f}" for s in candidates)
        notes.append(f"measured images/s: {shown}")
    if precision == "auto":
        why = "bf16 in hardware" if bf16_in_hardware(device) else "no bf16 in hardware"
        notes.append(f"precision auto -> {speed.precision} ({why})")
    if memory_format == "auto":
        notes.append(f"memory_format auto -> {speed.memory_format}")
    if cuda:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        # TF32 matmuls/convolutions: Ampere+ tensor cores at ~fp32 accuracy for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif cudnn_benchmark:
        notes.append("cudnn_benchmark skipped: CPU")
    return speed, notes


def step_rates(
    model: nn.Module, candidates: list[Speed], batch: int, size: int, rounds: int = 3
) -> dict[Speed, float]:
    """Images/s of a training step (forward, backward, SGD update) of a copy of `model` on a
    random batch, under each candidate: the best of `rounds` interleaved rounds of two timed
    steps after one warm-up (so a busy moment hurts every candidate alike). The model, its
    weights and the random number generators are left as they were."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        nets = {s: prepare(copy.deepcopy(model), s).train() for s in candidates}
        x = torch.rand(batch, 3, size, size, device=candidates[0].device)  # (B, 3, S, S)
        first = nets[candidates[0]].eval()
        with torch.no_grad():
            classes = first(candidates[0].inputs(x[:2])).shape[1]
        first.train()
        y = torch.randint(0, classes, (batch,), device=x.device)  # (B,)
        best = dict.fromkeys(candidates, 0.0)
        for _ in range(rounds):
            for s in candidates:
                net = nets[s]
                optimizer = torch.optim.SGD(net.parameters(), lr=1e-9)
                for step in range(3):  # the first is a warm-up
                    tic = time.perf_counter()
                    with s.autocast():
                        loss = nn.functional.cross_entropy(net(s.inputs(x)), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if step:
                        best[s] = max(best[s], batch / (time.perf_counter() - tic))
    return best


def cached_rates(key: str, measure: Measure) -> Measure:
    """`measure`, remembered per machine and `key` (the model and its input) in the user's
    cache folder, so each choice costs its seconds once."""

    def rates(candidates: list[Speed]) -> dict[Speed, float]:
        path = cache_file()
        machine = f"{cpu_name()} [{' '.join(sorted(cpu_flags() & _SPEED_FLAGS))}]"
        entry = f"{machine} torch {torch.__version__} x{torch.get_num_threads()} {key}"
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
        known = cache.get(entry, {}) if isinstance(cache, dict) else {}
        if all(s.label in known for s in candidates):
            return {s: float(known[s.label]) for s in candidates}
        found = measure(candidates)
        cache = cache if isinstance(cache, dict) else {}
        cache[entry] = known | {s.label: round(r, 1) for s, r in found.items()}
        with contextlib.suppress(OSError):  # a cache that cannot be written costs a measurement
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        return found

    return rates


# The flags that decide which kernels run (and so which setting is fastest).
_SPEED_FLAGS = BF16_FLAGS | {"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "fma"}


def cache_file() -> Path:
    """Where measured speeds are kept: $XDG_CACHE_HOME (default ~/.cache)/convnet-pipeline/."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convnet-pipeline" / "speed.json"


def prepare(model: nn.Module, speed: Speed) -> nn.Module:
    """Move `model` to the device in the chosen memory format."""
    model = model.to(speed.device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def memory_budget(setting: float | str, device: torch.device) -> int:
    """Bytes the training set may take on `device`: `setting` GiB, or "auto": half of what is
    free there now (GPU memory, or the machine's available memory for the CPU), the rest left
    to the model, its activations and everything else."""
    if setting != "auto":
        return int(float(setting) * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = psutil.virtual_memory().available
    return free // 2
