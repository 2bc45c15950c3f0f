"""Which device a stage runs on, and the speed settings (precision, memory format, compile).

Each setting resolves once per run into `Speed`; a setting the device cannot use is skipped
with the reason printed, never silently.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

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

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def label(self) -> str:
        """ "bf16/channels_last"."""
        return f"{self.precision}/{self.memory_format}"


# The CPU flags with which oneDNN runs bf16 convolutions and matmuls in hardware (AVX512-BF16,
# AMX). Without them bf16 is emulated.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


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
    """Whether `device` computes bf16 in hardware: a GPU of compute capability 8.0 or later
    (Ampere; earlier ones only emulate it, slower than fp32) or ROCm, a CPU with AVX512-BF16 or
    AMX."""
    if device.type == "cuda":
        with torch.cuda.device(device):  # the GPU this run uses, not the current one
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(cpu_flags() & BF16_FLAGS)


def resolve_speed(
    device: torch.device,
    precision: str = "auto",
    memory_format: str = "auto",
    compile: bool = False,
    cudnn_benchmark: bool = True,
    has_conv: bool = True,
) -> tuple[Speed, list[str]]:
    """Speed settings for `device` from params.yaml values, plus one note per decision.

    `auto` is a rule on what the hardware can do, not a timing, so that a reader can predict it
    and a busy moment cannot decide it:
    - precision: bf16 where the device computes it in hardware, else fp32. BENCHMARKS.md ("CPU
      precision, memory format and compile"): on a 2-core Xeon with AMX and AVX512-BF16 a
      tiny-imagenet-cpu epoch (resnet18) ran 1.41x faster in bf16 than in the best fp32 setting,
      its training step 1.53-1.67x, its 10-crop evaluation 3.0x, the loss step for step the
      same; on an AVX2-only CPU (emulated bf16) resnet18 and alexnet trained at 0.08-0.10x fp32.
    - memory_format: channels_last for conv nets, contiguous otherwise. BENCHMARKS.md: 1.1x for
      resnet18 and alexnet in fp32 on the AVX2 CPU, 1.08x in bf16 on the AMX one (407 against
      377 images/s). Models it slows down say so in conf/model/ (resnet50: contiguous).
    Timing the candidates instead gains nothing over the rule: idle, a timing chose what the rule
    chooses (BENCHMARKS.md: bf16, channels_last, 384 images/s against 380 set by hand); under
    load it chose by the load (docs/results.md: fp32 for resnet18 on the same AMX machine).
    """
    notes: list[str] = []
    cuda = device.type == "cuda"
    if precision == "fp16" and not cuda:
        notes.append("precision fp16 skipped: CPU autocast fp16 has no speed benefit; using fp32")
        precision = "fp32"
    if memory_format == "channels_last" and not has_conv:
        notes.append("memory_format channels_last skipped: the model has no convolutions")
        memory_format = "contiguous"
    if precision == "auto":
        bf16 = bf16_in_hardware(device)
        precision = "bf16" if bf16 else "fp32"
        why = (
            ("the GPU computes bf16" if bf16 else "the GPU has no bf16 in hardware") if cuda
            else f"the CPU has {' and '.join(sorted(cpu_flags() & BF16_FLAGS))}" if bf16
            else "the CPU has neither avx512_bf16 nor amx_bf16: bf16 would be emulated"
        )  # fmt: skip
        notes.append(f"precision auto -> {precision} ({why})")
    if memory_format == "auto":
        memory_format = "channels_last" if has_conv else "contiguous"
        why = "a conv net" if has_conv else "no convolutions"
        notes.append(f"memory_format auto -> {memory_format} ({why})")
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
