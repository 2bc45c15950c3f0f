"""Records of finished runs, and the tables in README.md and docs/ written from them.

`convnet record NAME` keeps what the workspace's last run was: its metrics, its params, the
dvc.lock entries of train and evaluate, what it ran with (out/train/run.json: commit, lock file,
machine, resolved speed settings, time), its epochs, and the one command that repeats it
(`dvc exp run -S recipe=... -S ...`, worked out from conf/). It refuses a workspace whose out/
is not what dvc.lock says, so a record is always a run DVC can account for. Records are JSON
files in records/, committed with the code.

`convnet tables` rewrites every results table of README.md and docs/*.md from the records: a
table sits between `<!-- records: PATTERN -->` and `<!-- end records -->` and lists the records
whose names match PATTERN (fnmatch), in name order. `--check` only says which are stale (the
test suite runs it), so a table can never disagree with its records.
"""

from __future__ import annotations

import csv
import datetime
import fnmatch
import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from stages import params as params_module
from stages.commands import published
from stages.commands.results import duration
from stages.core import paths
from stages.core.errors import PipelineError
from stages.core.files import write_json

RECORDS = Path("records")
DOCS = ("README.md", "docs/*.md")
METRICS = paths.EVALUATE / "metrics.json"
NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")
BLOCK = re.compile(r"(<!-- records: (\S+) -->\n)(.*?)(<!-- end records -->)", re.S)
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "epoch_seconds")


class RecordError(PipelineError):
    """The workspace holds no complete run that dvc.lock accounts for, or a bad name."""


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _lock_entry(lock: dict, stage: str) -> dict:
    entry = lock.get("stages", {}).get(stage)
    if entry is None:
        raise RecordError(f"dvc.lock has no {stage} stage: run the pipeline (`dvc repro`) first")
    return entry


def _check_outputs(root: Path, entry: dict, stage: str, files: list[Path]) -> None:
    """Each file (relative to `root`) is what dvc.lock's `stage` entry says it is (same md5)."""
    locked = {Path(o["path"]): o.get("md5") for o in entry.get("outs", [])}
    for f in files:
        if not (root / f).is_file():
            raise RecordError(f"{f}: missing; run the pipeline (`dvc repro`) first")
        if locked.get(f) != _md5(root / f):
            raise RecordError(
                f"{f} is not what dvc.lock's {stage} stage recorded: the workspace holds another"
                " run's outputs; `dvc repro` (or `dvc exp apply NAME`) first"
            )


def _value(value: Any) -> str:
    """A value in Hydra's override grammar, as `dvc exp run -S` reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[\w./-]+", value):
        return json.dumps(value)
    return str(value)


def command(data: dict[str, Any], conf: Path = Path("conf")) -> str:
    """The one command that composes exactly these params from conf/: the recipe (or the
    dataset and model) and a `-S` for each value that differs from what they compose."""
    recipe = data.get("recipe", "none")
    defaults = params_module.compose(conf)
    if recipe != "none":
        base = [f"recipe={recipe}"]
    else:
        base = [f"{g}={data[g]}" for g in ("dataset", "model") if data[g] != defaults[g]]
    composed = params_module.flatten(params_module.compose(conf, base))
    wanted = params_module.flatten(data)
    changed = [f"{k}={_value(wanted[k])}" for k in sorted(wanted) if composed.get(k) != wanted[k]]
    gone = sorted(composed.keys() - wanted.keys())
    if gone or params_module.flatten(params_module.compose(conf, base + changed)) != wanted:
        raise RecordError(
            "params.yaml cannot be composed from conf/ with -S overrides"
            f"{' (conf/ has ' + ', '.join(gone) + ')' if gone else ''}: was conf/ changed"
            " after the run? record the run with the conf/ it ran with"
        )
    parts = [*base, *changed]
    return (
        "dvc repro"
        if not parts
        else "dvc exp run " + " ".join(f"-S {shlex.quote(p)}" for p in parts)
    )


def record(name: str, root: Path = Path(".")) -> Path:
    """Write records/NAME.json from the workspace at `root`; returns its path."""
    if not NAME.fullmatch(name):
        raise RecordError(
            f"record name {name!r}: use lower-case letters, digits, '.' and '-'"
            " (e.g. mnist-vgg16-keras-sgd)"
        )
    lock_file = root / "dvc.lock"
    if not lock_file.is_file():
        raise RecordError("dvc.lock: not found; run the pipeline (`dvc repro`) first")
    lock = yaml.safe_load(lock_file.read_text()) or {}
    train, evaluate = _lock_entry(lock, "train"), _lock_entry(lock, "evaluate")
    _check_outputs(root, train, "train", [paths.CHECKPOINT, paths.RUN_INFO])
    _check_outputs(root, evaluate, "evaluate", [METRICS])
    data = params_module.read(root / "params.yaml")
    locked = params_module.flatten(train.get("params", {}).get("params.yaml", {}))
    here = params_module.flatten(data)
    if any(here.get(k) != v for k, v in locked.items()):
        raise RecordError(
            "params.yaml differs from the params dvc.lock's train stage ran with:"
            " `dvc repro` (or `dvc exp apply NAME`) first"
        )
    with open(root / paths.HISTORY) as f:
        rows = list(csv.DictReader(f))
    history = [{k: float(row[k]) for k in HISTORY_KEYS if k in row} for row in rows]
    out = root / RECORDS / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    write_json(
        out,
        {
            "name": name,
            "command": command(data, root / "conf"),
            "recorded": datetime.date.today().isoformat(),
            "dataset": data["dataset"],
            "model": data["model"],
            "recipe": data.get("recipe", "none"),
            "metrics": json.loads((root / METRICS).read_text()),
            "run": json.loads((root / paths.RUN_INFO).read_text()),
            "history": history,
            "params": data,
            "dvc_lock": {"train": train, "evaluate": evaluate},
        },
    )
    return out


# Keys params gained after records were made, with the value that does what the code did
# before them: a record without such a key ran as with that value.
ADDED = {
    "preprocess.tuning_split": 0,
    "train.resize_from": 0,
    "train.resize_start": 0,
    "train.resize_end": 0,
}


def load_records(root: Path = Path(".")) -> dict[str, dict]:
    """Every record in records/, by name (its params completed with `ADDED`)."""
    found = {f.stem: json.loads(f.read_text()) for f in sorted((root / RECORDS).glob("*.json"))}
    for r in found.values():
        for key, value in ADDED.items():
            *sections, name = key.split(".")
            section = r["params"]
            for part in sections:
                section = section[part]
            section.setdefault(name, value)
    return found


def _machine(run: dict) -> str:
    """ "Intel Xeon, 2 cores, amx_bf16 avx2 avx512_bf16 avx512f" """
    name = re.sub(r"\((R|TM)\)|\b(CPU|Processor)\b|@.*", "", run["device_name"])
    flags = f", {run['cpu_flags']}" if run["device"] == "cpu" and run["cpu_flags"] else ""
    return f"{' '.join(name.split())}, {run['cores']} cores{flags}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def table(records: list[dict]) -> str:
    """The Markdown table of these records, then the sources of the published figures."""
    lines = [
        "| command | model | epochs | top-1 | 10-crop top-1 / top-5 | published top-1 |"
        " training | precision | machine (load) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cited: list[published.Source] = []
    for r in records:
        m, run = r["metrics"], r["run"]
        ref = published.lookup(r["dataset"], r["model"], params_module.flatten(r["params"]))
        if ref is not None and ref.source not in cited:
            cited.append(ref.source)
        mark = f"{ref.top1:.2f}% [{cited.index(ref.source) + 1}]" if ref else ""
        whole = f" (whole image {_pct(m['full_image']['top1'])})" if "full_image" in m else ""
        lines.append(
            f"| `{r['command']}` | {r['model']} | {run['epochs']} |"
            f" {_pct(m['single_crop']['top1'])}{whole} |"
            f" {_pct(m['ten_crop']['top1'])} / {_pct(m['ten_crop']['top5'])} | {mark} |"
            f" {duration(run['train_seconds'])} | {run['precision']}, {run['memory_format']} |"
            f" {_machine(run)} ({run['load_average'].split()[-1]}) |"
        )
    lines += [
        "",
        "Records: `records/<name>.json` (" + ", ".join(r["name"] for r in records) + ");"
        " training: the sum of the epochs, validation included; load: the machine's 15-minute"
        " load average when training ended (2.0 is both cores busy).",
    ]
    if cited:
        lines += [
            "",
            *(f"- [{i}] {source.cite()}" for i, source in enumerate(cited, 1)),
        ]
    return "\n".join(lines) + "\n"


def doc_files(root: Path) -> list[Path]:
    return sorted({f for pattern in DOCS for f in root.glob(pattern)})


def tables(root: Path = Path("."), check: bool = False) -> list[Path]:
    """Rewrite (or with `check`, only compare) every records table; returns the stale files."""
    records = load_records(root)
    stale = []
    for doc in doc_files(root):
        text = doc.read_text()

        def fill(match: re.Match, doc: Path = doc) -> str:
            chosen = [records[n] for n in records if fnmatch.fnmatch(n, match.group(2))]
            if not chosen:
                raise RecordError(f"{doc}: no record matches {match.group(2)!r} in records/")
            return match.group(1) + table(chosen) + match.group(4)

        new = BLOCK.sub(fill, text)
        if new != text:
            stale.append(doc)
            if not check:
                doc.write_text(new)
    return stale
