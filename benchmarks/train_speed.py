"""Training-engine speed against the usual way (ImageFolder + transforms + DataLoader, 2 workers).

Fabricates 64x64 JPEGs in a temporary folder, trains on 56 px crops, prints images/s and the
ratios measured in this one run (the machine is shared: compare ratios, not absolute figures).
Each figure is the best of --repeats runs, engine and reference interleaved.

    python benchmarks/train_speed.py --images 512 --batch 64 --models mlp
    python benchmarks/train_speed.py --images 128 --batch 32 --models resnet18 \\
        --settings fp32,fp32+channels_last,bf16+channels_last

Measures: (1) the input pipeline alone; (2) one training epoch, engine
(stages.engine.loop.train_one_epoch) vs reference, and the engine vs the same model stepping on one
pre-made batch (the limit: what is left is the data path's cost); (3) 10-crop evaluation,
stages.engine.inference.predict_proba vs classifying one image at a time (TenCrop + ToTensor).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import datasets, transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's nets/, stages/
import nets  # noqa: E402
from stages.data.augment import augment  # noqa: E402
from stages.data.stream import Resident  # noqa: E402
from stages.engine.device import Speed, has_conv  # noqa: E402
from stages.engine.distributed import Dist  # noqa: E402
from stages.engine.inference import predict_proba  # noqa: E402
from stages.engine.loop import train_one_epoch  # noqa: E402
from stages.engine.schedules import Schedule  # noqa: E402
from stages.engine.state import RunState  # noqa: E402
from stages.params import TrainParams, compose  # noqa: E402

SIZE, CROP, CLASSES = 64, 56, 10
CPU = torch.device("cpu")
SETTINGS = {  # engine speed settings by name (the reference is always plain fp32, NCHW)
    "fp32": Speed(CPU),  # NCHW
    "fp32+channels_last": Speed(CPU, channels_last=True),
    "bf16": Speed(CPU, torch.bfloat16),
    "bf16+channels_last": Speed(CPU, torch.bfloat16, channels_last=True),
}


def fabricate(root: Path, n: int) -> np.ndarray:
    """n random JPEGs in CLASSES folders; returns them decoded, (n, 64, 64, 3) uint8."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % CLASSES}"
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    ref = datasets.ImageFolder(root)
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in ref.samples])


def loader(root: Path, batch: int, persistent: bool = False) -> torch.utils.data.DataLoader:
    tf = transforms.Compose(
        [transforms.RandomCrop(CROP), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )
    data = datasets.ImageFolder(root, tf)
    return torch.utils.data.DataLoader(
        data, batch, shuffle=True, num_workers=2, drop_last=True, persistent_workers=persistent
    )


def best_rate(n: int, fn, repeats: int) -> float:
    """Items per second: n items per call of fn, best of `repeats` timed calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def model_and_opt(name: str, opts: dict, speed: Speed = SETTINGS["fp32"]):
    torch.manual_seed(0)
    model = nets.build(name, CLASSES, CROP, **opts)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def reference_epoch(root: Path, name: str, opts: dict, batch: int) -> None:
    model, opt = model_and_opt(name, opts)
    for x, y in loader(root, batch):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def engine_epoch(train: Resident, name: str, opts: dict, batch: int, speed: Speed) -> None:
    model, opt = model_and_opt(name, opts, speed)
    t = TrainParams(
        **compose(REPO / "conf")["train"]
        | {"batch_size": batch, "crop_size": CROP, "warmup_epochs": 0, "epochs": 1, "lr": 0.01}
    )
    run = RunState(
        model, model, opt, Schedule(opt, t, len(train) // batch),
        torch.amp.GradScaler("cpu", enabled=False), None, torch.Generator().manual_seed(0),
        nn.functional.cross_entropy, speed, Dist(),
    )  # fmt: skip
    train_one_epoch(run, train, t, 1)


def fixed_batch(images, name: str, opts: dict, batch: int, steps: int, speed: Speed) -> None:
    """The limit: the same model stepping `steps` times on one batch the engine made once."""
    model, opt = model_and_opt(name, opts, speed)
    g = torch.Generator().manual_seed(0)
    x, y = speed.inputs(augment(images[:batch], CROP, 0, True, g)), torch.arange(batch) % CLASSES
    for _ in range(steps):
        with speed.autocast():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def ten_crop_tensors(img: np.ndarray) -> torch.Tensor:
    """The usual per-image preprocessing: PIL image -> TenCrop -> ToTensor each, (10, 3, S, S)."""
    crops = transforms.TenCrop(CROP)(Image.fromarray(img))
    return torch.stack([transforms.functional.to_tensor(c) for c in crops])


def one_image_at_a_time(model: nn.Module, val: torch.Tensor) -> None:
    """The usual 10-crop loop: one forward of one image's 10 crops at a time."""
    with torch.inference_mode():
        for img in val.numpy():
            model(ten_crop_tensors(img)).softmax(-1).mean(0)


def bench_pipeline(root: Path, images: torch.Tensor, batch: int, repeats: int) -> None:
    n = len(images)
    g = torch.Generator().manual_seed(0)

    def engine() -> None:  # what train_one_epoch does around the model
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            augment(images, CROP, 0, True, g, index=order[i : i + batch])

    persistent = loader(root, batch, persistent=True)
    runs = {
        "engine": engine,
        "reference": lambda: [None for _ in loader(root, batch)],
        "reference, persistent workers": lambda: [None for _ in persistent],
    }
    rates = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):  # interleaved: a noisy moment hits all three alike
        for key, run in runs.items():
            rates[key] = max(rates[key], best_rate(n, run, 1))
    print("input pipeline: " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in rates.items())
          + f"; ratio {rates['engine'] / rates['reference']:.1f}x (persistent workers:"
          f" {rates['engine'] / rates['reference, persistent workers']:.1f}x)",
          flush=True)  # fmt: skip


def bench_model(root: Path, images, labels, name: str, args: argparse.Namespace) -> None:
    opts = {"stem_stride": args.stem_stride} if name.startswith("resnet") else {}
    batch, steps = args.batch, len(labels) // args.batch
    ref, eng, limit = 0.0, {}, {}
    conv = has_conv(model_and_opt(name, opts)[0])
    for _ in range(args.repeats):
        ref = max(
            ref, best_rate(steps * batch, lambda: reference_epoch(root, name, opts, batch), 1)
        )
        for s in args.settings.split(","):
            sp = SETTINGS[s]
            if sp.channels_last and not conv:  # as train does: the format only matters to convs
                continue
            train = Resident(images.numpy(), labels.numpy(), CPU)
            run = partial(engine_epoch, train, name, opts, batch, sp)
            eng[s] = max(eng.get(s, 0.0), best_rate(steps * batch, run, 1))
            run = partial(fixed_batch, images, name, opts, batch, steps, sp)
            limit[s] = max(limit.get(s, 0.0), best_rate(steps * batch, run, 1))
    for s in eng:
        print(f"{name} epoch, engine {s}: {eng[s]:,.1f} img/s; fp32 reference {ref:,.1f}"
              f" img/s, ratio {eng[s] / ref:.2f}x; engine/limit {eng[s] / limit[s]:.2f}"
              f" (limit {limit[s]:,.1f} img/s)", flush=True)  # fmt: skip

    # As evaluate runs it: fp32, channels-last for conv nets; the reference: the usual NCHW.
    speed = SETTINGS["fp32+channels_last" if conv else "fp32"]
    fast = model_and_opt(name, opts, speed)[0].eval()
    val = images[: args.eval_images]
    predict_proba(fast, val[:2], CROP, 10, speed=speed)  # warm-up
    batch = partial(predict_proba, fast, val, CROP, 10, speed=speed)
    batched = best_rate(len(val), batch, args.repeats)
    model, _ = model_and_opt(name, opts)
    model.eval()
    single = best_rate(len(val), lambda: one_image_at_a_time(model, val), args.repeats)
    pil = best_rate(len(val), lambda: [ten_crop_tensors(img) for img in val.numpy()], args.repeats)
    print(f"{name} 10-crop eval: batched {batched:,.1f} img/s, one image at a time"
          f" {single:,.1f} img/s (of which PIL + TenCrop + ToTensor {single / pil:.0%}),"
          f" ratio {batched / single:.1f}x", flush=True)  # fmt: skip
    if args.profile:  # where the batched path spends its time
        with torch.profiler.profile() as prof:
            batch()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512, help="fabricated training images")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--models", default="mlp", help="comma-separated registry names")
    ap.add_argument("--settings", default="fp32,fp32+channels_last", help=", ".join(SETTINGS))
    ap.add_argument("--stem-stride", type=int, default=1, help="resnet stem stride")
    ap.add_argument("--eval-images", type=int, default=64, help="images for the 10-crop test")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile the batched 10-crop path")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, images {args.images},"
          f" batch {args.batch}, crops {CROP} from {SIZE}, best of {args.repeats}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = torch.from_numpy(fabricate(root, args.images))  # (N, 64, 64, 3), = preprocess
        labels = torch.arange(args.images) % CLASSES
        if not args.skip_pipeline:
            bench_pipeline(root, images, args.batch, args.repeats)
        for name in args.models.split(","):
            bench_model(root, images, labels, name, args)


if __name__ == "__main__":
    main()
