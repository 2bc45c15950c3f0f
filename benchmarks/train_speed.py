"""Training-engine speed against the usual way (ImageFolder + transforms + DataLoader, 2 workers).

Fabricates 64x64 JPEGs in a temporary folder, trains on 56 px crops, prints images/s and
ratios measured in this one run (the machine is shared: compare ratios, not absolute figures).

    python benchmarks/train_speed.py --images 512 --batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import datasets, transforms

import nets
from stages.data import augment
from stages.device import Speed
from stages.distributed import Dist
from stages.inference import predict_proba
from stages.params import TrainParams
from stages.schedules import Schedule
from stages.train import Engine, train_one_epoch

SIZE, CROP, CLASSES = 64, 56, 10


def fabricate(root: Path, n: int) -> np.ndarray:
    """n random JPEGs in CLASSES folders; returns their decoded uint8 (n, 64, 64, 3) array."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % CLASSES}"
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    ref = datasets.ImageFolder(root)
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in ref.samples])


def loader(root: Path, batch: int) -> torch.utils.data.DataLoader:
    tf = transforms.Compose(
        [transforms.RandomCrop(CROP), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )
    data = datasets.ImageFolder(root, tf)
    return torch.utils.data.DataLoader(data, batch, shuffle=True, num_workers=2, drop_last=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_and_opt(name: str, opts: dict) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nets.build(name, CLASSES, CROP, **opts)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def reference_epoch(root: Path, name: str, opts: dict, batch: int) -> float:
    model, opt = model_and_opt(name, opts)
    seen = 0

    def run() -> None:
        nonlocal seen
        for x, y in loader(root, batch):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)

    seconds = timed(run)  # before reading `seen`, which run() fills
    return seen / seconds


def engine_epoch(images, labels, name: str, opts: dict, batch: int, speed: Speed) -> float:
    model, _ = model_and_opt(name, opts)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    t = TrainParams(batch_size=batch, crop_size=CROP, warmup_epochs=0, epochs=1, lr=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    steps = len(labels) // batch
    e = Engine(model, model, opt, Schedule(opt, t, steps), nn.functional.cross_entropy,
               torch.amp.GradScaler("cpu", enabled=False), None, speed, Dist(),
               torch.Generator().manual_seed(0))  # fmt: skip
    return steps * batch / timed(lambda: train_one_epoch(e, images, labels, t, 1))


def fixed_batch(name: str, opts: dict, batch: int, steps: int, speed: Speed) -> float:
    """The limit: the same model stepping on one pre-made batch."""
    model, opt = model_and_opt(name, opts)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = speed.inputs(torch.rand(batch, 3, CROP, CROP)), torch.randint(0, CLASSES, (batch,))

    def run() -> None:
        for _ in range(steps):
            with speed.autocast():
                loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    return steps * batch / timed(run)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--models", default="mlp,resnet18")
    args = ap.parse_args()
    cpu = torch.device("cpu")
    fp32, bf16cl = Speed(cpu), Speed(cpu, torch.bfloat16, channels_last=True)
    opts = {"mlp": {}, "resnet18": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        arr = fabricate(root, args.images)
        images = torch.from_numpy(arr)  # (N, 64, 64, 3) uint8, decoded once (= preprocess)
        labels = torch.arange(args.images) % CLASSES
        g = torch.Generator().manual_seed(0)

        def pipe_engine() -> None:
            for i in range(0, args.images - args.batch + 1, args.batch):
                augment(images[i : i + args.batch], CROP, 0, True, g)

        ref_pipe = args.images / timed(lambda: [None for _ in loader(root, args.batch)])
        pipe_engine()  # warm-up: first-call allocations
        eng_pipe = 5 * args.images / timed(lambda: [pipe_engine() for _ in range(5)])
        print(f"input pipeline: engine {eng_pipe:,.0f} img/s, reference {ref_pipe:,.0f} img/s,"
              f" ratio {eng_pipe / ref_pipe:.1f}x", flush=True)  # fmt: skip

        for name in args.models.split(","):
            ref = reference_epoch(root, name, opts[name], args.batch)
            for label, speed in (("fp32", fp32), ("bf16+channels_last", bf16cl)):
                if name == "mlp" and speed is bf16cl:
                    continue
                eng = engine_epoch(images, labels, name, opts[name], args.batch, speed)
                steps = args.images // args.batch
                limit = fixed_batch(name, opts[name], args.batch, steps, speed)
                print(f"{name} epoch {label}: engine {eng:,.1f} img/s, fp32 reference"
                      f" {ref:,.1f} img/s, ratio {eng / ref:.2f}x; engine/limit"
                      f" {eng / limit:.2f} (limit {limit:,.1f} img/s)", flush=True)  # fmt: skip

        model, _ = model_and_opt("resnet18" if "resnet18" in args.models else "mlp", {})
        model.eval()
        val = images[: min(128, args.images)]
        batched = timed(lambda: predict_proba(model, val, CROP, 10, 64))
        to_tensor = transforms.functional.to_tensor
        stack = transforms.Lambda(lambda crops: torch.stack([to_tensor(c) for c in crops]))
        tf = transforms.Compose([transforms.TenCrop(CROP), stack])  # -> (10, 3, S, S)

        def one_at_a_time() -> None:
            with torch.inference_mode():
                for img in val.numpy():
                    model(tf(Image.fromarray(img))).softmax(-1).mean(0)

        single = timed(one_at_a_time)
        print(f"10-crop eval: batched {len(val) / batched:,.1f} img/s, one image at a time"
              f" {len(val) / single:,.1f} img/s, ratio {single / batched:.1f}x")  # fmt: skip


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
