"""Every Tiny ImageNet preset on real data, on this machine: its first steps, its loss falling,
its images/s, and the projected time of its whole recipe.

    python benchmarks/presets.py --processed PATH/out/processed [--steps 200] [--presets a,b]
        [--variant train.precision=fp32 --variant train.precision=bf16 ...]

PATH is a workspace where `dvc repro preprocess` (or `python -m stages preprocess -S
dataset=tiny-imagenet`) ran on the real set. For each recipe of conf/recipe/ whose dataset is
tiny-imagenet, the model, optimizer, schedule and augmentation are built exactly as the train
stage builds them (its params as conf/ composes them, on the CPU), then trained for --steps
steps by the engine's own loop (stages.engine.loop.train_one_epoch, on 10 random parts of the
real training set of --steps/10 batches each).
Prints the mean loss of each tenth of the steps (falling: it learns), the training images/s (also
without the first tenth, where `compile` and the first steps' warm-up fall), and
epochs x 100,000 images / that rate: the recipe's training time here (validation not counted).
With --variant (a comma-separated list of overrides, given once per variant), each preset runs
once per variant, the variants of a preset one after the other, so their ratio is measured under
the same load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's nets/ and stages/
from stages import params as params_module  # noqa: E402
from stages import train as train_stage  # noqa: E402
from stages.data.processed import load_processed  # noqa: E402
from stages.data.stream import Resident  # noqa: E402
from stages.engine.distributed import Dist  # noqa: E402
from stages.engine.loop import train_one_epoch  # noqa: E402

CPU = torch.device("cpu")


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def bench(name: str, processed: Path, steps: int, variant: str) -> str:
    overrides = [o for o in variant.split(",") if o]
    composed = params_module.compose(
        REPO / "conf", [f"recipe={name}", "train.device=cpu", *overrides]
    )
    p = params_module.from_dict(composed)
    data = load_processed(p.preprocess_inputs(), folder=processed)
    torch.manual_seed(p.seed)
    run, _ = train_stage._build(p, Dist(), CPU, data)  # exactly as the train stage builds it
    losses, seen, seconds = [], [], []  # per tenth of the steps
    batches = max(1, steps // 10)  # an "epoch" here: this many batches of a random part
    size = batches * p.train.batch_size
    order = torch.randperm(len(data.train_labels)).numpy()
    for i in range(steps // batches):
        part = order[i * size : (i + 1) * size]
        train = Resident(data.train_images[part], data.train_labels[part], CPU)
        start = time.perf_counter()
        row = train_one_epoch(run, train, p.train, 1)
        seconds.append(time.perf_counter() - start)
        losses.append(row["train_loss"])
        seen.append(row["images"])
    rate = sum(seen) / sum(seconds)
    # Without the first tenth: the rate once compile and the allocator's warm-up are paid.
    steady = sum(seen[1:]) / sum(seconds[1:]) if len(seen) > 1 else rate
    recipe = p.train.epochs * len(data.train_labels) / rate
    falling = "falling" if losses[-1] < losses[0] else "NOT falling"
    return (
        f"| {name} | {variant or '-'} | {p.model} | {p.train.batch_size} | {p.train.epochs} |"
        f" {rate:,.1f} | {steady:,.1f} | {' '.join(f'{v:.2f}' for v in losses)} ({falling}) |"
        f" {hours(recipe)} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processed", type=Path, required=True, help="the real set's out/processed")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument(
        "--presets", default="", help="comma-separated (default: every Tiny ImageNet one)"
    )
    ap.add_argument(
        "--variant", action="append", default=[],
        help="comma-separated overrides (e.g. train.precision=bf16); repeat to compare variants",
    )  # fmt: skip
    a = ap.parse_args()
    recipes = sorted(f.stem for f in (REPO / "conf" / "recipe").glob("*.yaml"))
    names = a.presets.split(",") if a.presets else [
        n for n in recipes
        if params_module.compose(REPO / "conf", [f"recipe={n}"])["dataset"] == "tiny-imagenet"
    ]  # fmt: skip
    print(f"{a.steps} steps each, {torch.get_num_threads()} threads, {a.processed}")
    print("| preset | variant | model | batch | epochs | images/s | images/s after the first"
          " tenth | loss per tenth of the steps | recipe's training time here |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for variant in a.variant or [""]:
            print(bench(name, a.processed, a.steps, variant), flush=True)


if __name__ == "__main__":
    main()
