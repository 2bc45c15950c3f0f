"""lr-find, ensemble and submit on tiny fabricated problems."""

import re

import numpy as np
import pytest
import torch
from helpers import fabricate
from helpers.fabricate import full_params
from helpers.processes import with_store
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from stages.cli import app
from stages.commands.lrfind import range_test
from stages.core import paths
from stages.params import yaml_text


def test_range_test_suggests_a_rate_inside_its_range_and_stops_on_divergence():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(10, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def batches():
        while True:
            for i in range(0, 256, 32):
                yield x[i : i + 32], y[i : i + 32]

    result = range_test(model, optimizer, batches(), start=1e-4, end=1e4, steps=120)
    assert 1e-4 <= result.suggestion <= 1e4
    assert len(result.lrs) < 120  # the loss blew up before the end of the range
    lrs = np.array(result.lrs)
    assert np.allclose(lrs[1:] / lrs[:-1], lrs[1] / lrs[0])  # exponential growth
    i_min = int(np.argmin(result.losses))
    assert result.losses[i_min] < result.losses[0]  # the loss fell before it diverged
    assert result.suggestion == pytest.approx(result.lrs[i_min] / 10)


def test_lr_find_command_writes_plot_and_logs_a_run(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    fabricate.processed(tmp_path)
    partial = {"train": {"crop_size": 12, "batch_size": 8}}
    (tmp_path / "params.yaml").write_text(yaml_text(full_params(partial, "model=logreg")))
    result = CliRunner().invoke(app, ["lr-find", "--steps", "12", "--start", "1e-3"])
    assert result.exit_code == 0, result.output
    suggested = float(re.search(r"suggested train.lr = (\S+) ", result.output).group(1))
    assert 1e-3 <= suggested <= 10
    assert {f.name for f in paths.LR_FIND.iterdir()} == {"lr_find.csv", "lr_find.png"}
    [run] = mlflow.search_runs(experiment_names=["convnet-pipeline"], output_format="list")
    assert run.data.tags["kind"] == "lr-find"
    assert run.data.metrics["suggested_lr"] == pytest.approx(suggested, rel=1e-2)


def test_ensemble_of_two_copies_equals_the_single_model(tmp_path, monkeypatch):
    from stages.commands.ensemble import average_proba, ensemble
    from stages.engine.model import load_trained

    monkeypatch.chdir(tmp_path)
    fabricate.processed(tmp_path)
    fabricate.save_checkpoint(tmp_path / "a.pt", fabricate.model(0))
    fabricate.save_checkpoint(tmp_path / "b.pt", fabricate.model(0))
    fabricate.save_checkpoint(tmp_path / "c.pt", fabricate.model(1))
    images, _ = fabricate.images(16, 1)
    model = load_trained(tmp_path / "a.pt", "cpu")
    single = model.predict(images, 10)
    twin = load_trained(tmp_path / "b.pt", "cpu")
    mean, each = average_proba([model, twin], images, 10)
    assert torch.allclose(mean, single, atol=1e-6) and len(each) == 2

    out = tmp_path / "ens.json"
    two = ensemble(["a.pt", "b.pt"], crops=10, out=out, device="cpu")
    assert two["ensemble"] == {k: two["members"]["a.pt"][k] for k in ("top1", "top5")}
    assert out.exists()
    mixed = ensemble(["a.pt", "c.pt"], crops=1, device="cpu")
    assert set(mixed["members"]) == {"a.pt", "c.pt"}


def test_ensemble_member_that_is_neither_file_nor_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    fabricate.processed(tmp_path)
    result = CliRunner().invoke(app, ["ensemble", "0123456789abcdef", "--device", "cpu"])
    assert result.exit_code == 1
    assert "0123456789abcdef: neither a checkpoint file nor an MLflow run" in result.output
    assert "Traceback" not in result.output


def test_submission_has_one_line_per_test_image_in_challenge_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fabricate.processed(tmp_path)  # its info.json maps classes to wnids
    fabricate.save_checkpoint(tmp_path / "model.pt", fabricate.model())
    folder = tmp_path / "test" / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(7):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"test_{i}.JPEG")
    (folder / "README.txt").write_text("not a test image")
    args = ["submit", "--images", str(folder), "--checkpoint", "model.pt", "--out", "sub.txt",
            "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "sub.txt").read_text().splitlines()
    assert len(lines) == 7
    assert [line.split()[0] for line in lines] == sorted(f"test_{i}.JPEG" for i in range(7))
    assert all(re.fullmatch(r"test_\d\.JPEG n0000000[0-3]", line) for line in lines)


def test_submit_writes_the_wnids_its_checkpoint_carries_whatever_out_processed_holds(
    tmp_path, monkeypatch
):
    """A Tiny ImageNet model's classes are words ("rocking chair"); its checkpoint carries the
    wnids. Without out/processed, or with a damaged info.json there, the submission still holds
    wnids, not words; hidden files (macOS's ._test_0.JPEG) are not test images."""
    monkeypatch.chdir(tmp_path)
    words = ["rocking chair", "goldfish", "lemon", "school bus"]
    data = {"dataset": "tiny-imagenet", "wnids": fabricate.WNIDS}
    fabricate.save_checkpoint(tmp_path / "model.pt", fabricate.model(), classes=words, data=data)
    folder = tmp_path / "test"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (80 * i, 0, 0)).save(folder / f"test_{i}.JPEG")
    (folder / "._test_0.JPEG").write_bytes(b"\0\x05\x16\x07 AppleDouble")
    args = ["submit", "--images", "test", "--checkpoint", "model.pt", "--out", "sub.txt",
            "--device", "cpu"]  # fmt: skip
    for processed in ("none", "damaged"):
        if processed == "damaged":
            fabricate.processed(tmp_path)
            (tmp_path / "out/processed/info.json").write_text('{"wnids": ["n0')
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        lines = (tmp_path / "sub.txt").read_text().splitlines()
        assert [line.split()[0] for line in lines] == [f"test_{i}.JPEG" for i in range(3)]
        assert all(line.split()[1] in fabricate.WNIDS for line in lines), lines


def test_submit_without_test_images_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["submit", "--images", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "no such folder of test images" in result.output
