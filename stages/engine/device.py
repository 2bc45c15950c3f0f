"""Which device a stage runs on, and the speed settings (precision, memory format, compile).

Each setting resolves once per run into `Speed`; a setting the device cannot use is skipped
with the reason printed, never silently.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from stages.core.errors import PipelineError

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


def resolve_speed(
    device: torch.device,
    precision: str = "auto",
    memory_format: str = "auto",
    compile: bool = False,
    cudnn_benchmark: bool = True,
    has_conv: bool = True,
) -> tuple[Speed, list[str]]:
    """Speed settings for `device` from params.yaml values, plus one note per decision."""
    notes: list[str] = []
    cuda = device.type == "cuda"
    if precision == "auto":
        # CPU: fp32. On this project's reference CPU (AVX2, no AVX-512/AMX) bf16 autocast
        # trained conv nets at ~0.1x and the mlp at 0.4x fp32's speed (BENCHMARKS.md); pick
        # bf16 by hand on a CPU with AMX / AVX512-BF16 after measuring it there.
        bf16_ok = cuda and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16_ok else "fp32"
        notes.append(f"precision auto -> {precision}")
    if precision == "fp16" and not cuda:
        notes.append("precision fp16 skipped: CPU autocast fp16 has no speed benefit; using fp32")
        precision = "fp32"
    if memory_format == "auto":
        # Conv nets: channels_last everywhere. On the reference CPU it trained resnet18 and
        # alexnet ~1.1x faster than NCHW (BENCHMARKS.md), and the pipeline's batches come out
        # of the packed (N, H, W, 3) images in that layout.
        memory_format = "channels_last" if has_conv else "contiguous"
        notes.append(f"memory_format auto -> {memory_format}")
    elif memory_format == "channels_last" and not has_conv:
        notes.append("memory_format channels_last skipped: the model has no convolutions")
        memory_format = "contiguous"
    if compile and not cuda and shutil.which("c++") is None and shutil.which("g++") is None:
        notes.append("compile skipped: torch.compile on the CPU needs a C++ compiler (none found)")
        compile = False
    if cuda:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        # TF32 matmuls/convolutions: Ampere+ tensor cores at ~fp32 accuracy for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif cudnn_benchmark:
        notes.append("cudnn_benchmark skipped: CPU")
    speed = Speed(device, DTYPES[precision], memory_format == "channels_last", compile)
    return speed, notes


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
