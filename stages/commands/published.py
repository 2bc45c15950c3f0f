"""Published results the project's runs are set beside, read from published.yaml (beside this
file): each figure with the paper or write-up it comes from (author, title, address, where in
it). `convnet results` and the tables written from records (`convnet tables`) both read it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

FILE = Path(__file__).with_name("published.yaml")


@dataclass(frozen=True)
class Source:
    """Where a published figure is printed."""

    author: str
    title: str
    year: int
    url: str
    where: str  # the table, section or line

    def cite(self) -> str:
        year = f" ({self.year})" if self.year else ""
        where = f"{self.where}: {self.url}" if self.url else f"{self.where} (no address known)"
        return f'{self.author}, "{self.title}"{year}, {where}'


@dataclass(frozen=True)
class Reference:
    """A published top-1 (and top-5 when reported), in percent, for runs of one dataset and
    model whose params match `when` (flat keys, e.g. {"train.optimizer": "adam"})."""

    dataset: str
    model: str
    top1: float
    top5: float | None
    when: dict[str, Any]
    note: str  # what the published run was, in a few words
    source: Source

    def matches(self, dataset: str, model: str, params: dict[str, Any]) -> bool:
        return (dataset, model) == (self.dataset, self.model) and all(
            str(params.get(k)) == str(v) for k, v in self.when.items()
        )


@cache
def references() -> tuple[Reference, ...]:
    """Every published figure of published.yaml, with its source."""
    data = yaml.safe_load(FILE.read_text())
    sources = {key: Source(**value) for key, value in data["sources"].items()}
    return tuple(
        Reference(
            dataset=r["dataset"],
            model=r["model"],
            top1=float(r["top1"]),
            top5=None if r.get("top5") is None else float(r["top5"]),
            when=r.get("when") or {},
            note=r["note"],
            source=sources[r["source"]],
        )
        for r in data["results"]
    )


def lookup(dataset: str, model: str, params: dict[str, Any]) -> Reference | None:
    """The published figure for a run of `model` on `dataset` with these flat params, if any."""
    return next((r for r in references() if r.matches(dataset, model, params)), None)
