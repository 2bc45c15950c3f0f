"""Where a training step's time goes, by kind of work, for a recipe's model on this machine.

    python benchmarks/step_profile.py --recipe tiny-imagenet-cpu [--steps 20] [--precision fp32]

Builds the recipe's run exactly as the train stage does (stages.train._build: model, optimizer,
schedule, augmentation, speed settings) on a fabricated set of its images' size (uniform uint8
noise: the speed of a step does not depend on what the pixels show), trains --steps steps
through the engine's own loop under torch.profiler, and prints the self time of the operators
grouped by kind (convolution, batch norm, activation, optimizer, augmentation and copies, ...)
and the 10-crop evaluation of a batch of validation images, as shares of the whole. The first
line gives the CPU's flags that decide the kernels (lscpu), the torch version and threads.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's nets/ and stages/
from stages import params as params_module  # noqa: E402
from stages import train as train_stage  # noqa: E402
from stages.data.processed import Processed  # noqa: E402
from stages.data.stream import Resident  # noqa: E402
from stages.engine import device as device_module  # noqa: E402
from stages.engine import provenance  # noqa: E402
from stages.engine.distributed import Dist  # noqa: E402
from stages.engine.inference import predict_proba  # noqa: E402
from stages.engine.loop import train_one_epoch  # noqa: E402

CPU = torch.device("cpu")
# Operator name patterns -> kind, first match wins (aten names, with and without "aten::").
KINDS = [
    ("convolution", r"conv|mkldnn_convolution|_convolution"),
    ("batch norm", r"batch_norm"),
    ("matmul / linear", r"addmm|\bmm\b|matmul|linear"),
    ("activation", r"relu|prelu|threshold"),
    ("pooling", r"pool"),
    ("loss / softmax", r"cross_entropy|log_softmax|nll_loss|softmax"),
    ("optimizer", r"_foreach|_fused|sgd|adam|lerp|addcmul|addcdiv"),
    ("augmentation (crop, flip, jitter)", r"index|gather|take|flip|where|rand|bernoulli"),
    ("copies, layout, dtype", r"copy_|contiguous|to\b|_to_copy|clone|empty|cat|stack|view"),
    ("elementwise", r"add|mul|sub|div|sum|mean|fill|zero|clamp|sqrt|exp"),
]


def kind(name: str) -> str:
    short = name.removeprefix("aten::")
    return next((k for k, pattern in KINDS if re.search(pattern, short)), "other")


def fabricated(p: params_module.Params, n: int) -> Processed:
    """n training and n/4 validation images of the recipe's dataset's size, 200 classes."""
    size = {"tiny-imagenet": 64, "imagenet64": 64}.get(p.dataset, 32)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    val = rng.integers(0, 256, (n // 4, size, size, 3), dtype=np.uint8)
    classes = [f"c{i}" for i in range(200)]
    return Processed(
        images, np.arange(n) % 200, val, np.arange(n // 4) % 200, classes,
        images.mean(0).astype(np.float32), [60.0, 60.0, 60.0], {"dataset": p.dataset},
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="tiny-imagenet-cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--precision", default="fp32", help="fp32 | bf16 | auto")
    ap.add_argument("--memory-format", default="auto", help="auto | channels_last | contiguous")
    a = ap.parse_args()
    composed = params_module.compose(
        REPO / "conf",
        [f"recipe={a.recipe}", "train.device=cpu", f"train.precision={a.precision}",
         f"train.memory_format={a.memory_format}"],
    )  # fmt: skip
    p = params_module.from_dict(composed)
    batch = p.train.batch_size
    data = fabricated(p, batch * (a.steps + 2))
    torch.manual_seed(p.seed)
    run, notes = train_stage._build(p, Dist(), CPU, data)  # exactly as the train stage builds it
    flags = provenance.machine(CPU)["cpu_flags"]
    print(f"{device_module.cpu_name()} [{flags}], torch {torch.__version__},"
          f" {torch.get_num_threads()} threads; {a.recipe}: {p.model}, batch {batch},"
          f" {p.train.crop_size} px; {run.speed.label} ({'; '.join(notes)})")  # fmt: skip
    # An epoch of 2 batches to warm up (allocator, oneDNN primitives), then one of --steps.
    images, labels, warm = data.train_images, data.train_labels, 2 * batch
    train_one_epoch(run, Resident(images[:warm], labels[:warm], CPU), p.train, 1)
    train = Resident(images[warm:], labels[warm:], CPU)
    val = data.val_images[:batch]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tic = time.perf_counter()
        row = train_one_epoch(run, train, p.train, 1)
        step_s = (time.perf_counter() - tic) / a.steps
        tic = time.perf_counter()
        predict_proba(run.model, val, p.train.crop_size, 10, batch, speed=run.speed)
        ten_crop_s = time.perf_counter() - tic
    print(f"{row['images'] / (step_s * a.steps):.0f} images/s training ({step_s * 1e3:.0f} ms a"
          f" step); 10-crop of {len(val)} images: {ten_crop_s * 1e3:.0f} ms"
          f" ({len(val) / ten_crop_s:.0f} images/s)")  # fmt: skip
    by_kind: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_kind[kind(event.key)] += event.self_cpu_time_total
        by_op[event.key] += event.self_cpu_time_total
    total = sum(by_kind.values())
    print("\n| kind | share of the self time (training and the 10-crop above) |\n|---|---|")
    for name, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {t / total:.1%} |")
    print("\n| operator | share |\n|---|---|")
    for name, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:15]:
        print(f"| {name} | {t / total:.1%} |")


if __name__ == "__main__":
    main()
