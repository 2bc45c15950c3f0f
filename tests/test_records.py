"""Every result the README and docs/ state comes from a committed record (records/*.json), and
the command beside it repeats it: tables written from the records, records that conf/ composes,
published figures with their sources."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from stages import params
from stages.commands import published, records

REPO = Path(__file__).resolve().parents[1]
ALL = records.load_records(REPO)
# A figure in a table row, other than a published one marked "~" (approximate) or one in a
# published-top-1 column written from published.yaml.
FIGURE = re.compile(r"(?<![~\d.])\d+(\.\d+)?%")


def test_tables_match_their_records():
    stale = records.tables(REPO, check=True)
    assert not stale, f"tables differ from records/ in {stale}: run `convnet tables`"


def test_no_result_table_outside_the_written_blocks():
    """A table row with a percentage in README.md or docs/ lies in a block `convnet tables`
    writes from records: nobody types a result by hand."""
    typed = []
    for doc in records.doc_files(REPO):
        text = records.BLOCK.sub("", doc.read_text())
        for line in text.splitlines():
            if line.startswith("|") and FIGURE.search(line):
                typed.append(f"{doc.relative_to(REPO)}: {line[:80]}")
    assert not typed, "results typed by hand (make a record, then `convnet tables`):\n" + "\n".join(
        typed
    )


def test_every_block_lists_records():
    patterns = [
        m.group(2) for d in records.doc_files(REPO) for m in records.BLOCK.finditer(d.read_text())
    ]
    assert patterns, "README.md and docs/ have no records table"


@pytest.mark.parametrize("name", sorted(ALL))
def test_the_command_beside_a_record_composes_its_params(name):
    """Run in a fresh clone, the record's command trains with exactly the recorded params."""
    r = ALL[name]
    command = r["command"]
    overrides = re.findall(r"-S '?([^' ]+)'?", command)
    composed = params.compose(REPO / "conf", overrides)
    assert params.flatten(composed) == params.flatten(r["params"]), command
    assert command == records.command(r["params"], REPO / "conf")
    # What the run ran with, and the code and environment it came from.
    run = r["run"]
    assert re.fullmatch(r"[0-9a-f]{40}", run["commit"]), run["commit"]
    assert re.fullmatch(r"[0-9a-f]{64}", run["lock_sha256"]), run["lock_sha256"]
    assert run["precision"] in ("fp32", "bf16", "fp16") and run["train_seconds"] > 0
    assert r["dvc_lock"]["train"]["params"]["params.yaml"]["model"] == r["model"]
    assert len(r["history"]) == run["epochs"] == r["params"]["train"]["epochs"]


def test_record_refuses_a_workspace_dvc_lock_does_not_account_for(tmp_path):
    """A record is a run DVC can account for: out/ edited after the run is refused."""
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    shutil.copy(REPO / "params.yaml", tmp_path)
    with pytest.raises(records.RecordError, match="dvc.lock: not found"):
        records.record("digits-alexnet", tmp_path)
    with pytest.raises(records.RecordError, match="record name"):
        records.record("Bad Name", tmp_path)


def test_command_is_dvc_repro_for_the_defaults_and_names_each_change():
    conf = REPO / "conf"
    assert records.command(params.compose(conf), conf) == "dvc repro"
    changed = params.compose(conf, ["recipe=mnist-vgg16-keras-sgd", "train.epochs=1"])
    assert records.command(changed, conf) == (
        "dvc exp run -S recipe=mnist-vgg16-keras-sgd -S train.epochs=1"
    )
    listed = params.compose(conf, ["model=mlp", "report.pictures=[curves,filters]"])
    assert records.command(listed, conf) == (
        "dvc exp run -S model=mlp -S 'report.pictures=[curves,filters]'"
    )


def test_published_figures_have_sources():
    refs = published.references()
    assert {(r.dataset, r.model) for r in refs} >= {
        ("tiny-imagenet", "vgg16"),
        ("tiny-imagenet", "alexnet"),
        ("tiny-imagenet", "logreg"),
        ("tiny-imagenet", "mlp"),
    }
    for r in refs:
        assert r.source.author and r.source.title and r.source.where, r
        assert 0 < r.top1 <= 100
    sgd = published.lookup("mnist", "vgg16-keras", {"train.optimizer": "sgd"})
    adam = published.lookup("mnist", "vgg16-keras", {"train.optimizer": "adam"})
    assert (sgd.top1, adam.top1) == (99.14, 99.24)


def test_records_are_plain_json_with_their_name(tmp_path):
    for name, r in ALL.items():
        assert r["name"] == name
        json.dumps(r)  # nothing but JSON


def test_time_to_accuracy_draws_the_records_it_is_given(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tta", REPO / "tools/time_to_accuracy.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "curves.png"
    assert tool.main([str(out), "mnist-*", "digits-alexnet"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    drawn = capsys.readouterr().out
    assert "digits-alexnet" in drawn and "mnist-vgg16-keras-sgd-e3" in drawn
    with pytest.raises(SystemExit) as stopped:
        tool.main([str(tmp_path / "none.png"), "no-such-record"])
    assert stopped.value.code == 2 and not (tmp_path / "none.png").exists()
