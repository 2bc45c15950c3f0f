"""Validation top-1 against training minutes, one line per record: how fast each recipe learns.

    python tools/time_to_accuracy.py OUT.png NAME [NAME ...]

NAME is a record of records/ (or an fnmatch pattern of them, e.g. 'tiny-imagenet-cpu-*'). The
x axis is the running sum of each epoch's `epoch_seconds` (validation not included), the y axis
the epoch's centre-crop validation top-1; the 10-crop top-1 of the finished run is marked at
its end. The records' own figures, nothing recomputed.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.commands.records import load_records  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("names", nargs="+", help="records (names or fnmatch patterns)")
    args = parser.parse_args(argv)
    records = load_records(ROOT)
    chosen = [n for n in records if any(fnmatch.fnmatch(n, p) for p in args.names)]
    if not chosen:
        parser.error(f"no record in records/ matches {' '.join(args.names)}")
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for name in chosen:
        r = records[name]
        minutes = np.cumsum([row["epoch_seconds"] for row in r["history"]]) / 60
        top1 = [100 * row["val_top1"] for row in r["history"]]
        (line,) = ax.plot(minutes, top1, marker="o", markersize=3, label=name)
        ax.plot(minutes[-1], 100 * r["metrics"]["ten_crop"]["top1"], marker="*", markersize=12,
                color=line.get_color(), linestyle="none")  # fmt: skip
    ax.set_xlabel("training minutes (sum of epoch times)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("centre crop after each epoch; * the 10-crop of the finished run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out} ({', '.join(chosen)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
