"""Saliency, filter pictures and the report stage, on crafted models and fabricated outputs."""

import mlflow
import pytest
import torch
from helpers import fabricate
from helpers.processes import with_store
from torch import nn

from stages.core import paths
from stages.explain.filters import excite, first_layer_filters, receptive_field
from stages.explain.pictures import normalise_each, tile_grid
from stages.explain.saliency import saliency


class OnePixel(nn.Module):
    """Class scores that depend on input pixel (channel 1, row 5, column 7) only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 1, 5, 7]  # (B,)
        return torch.stack([3 * v, -v, v**2], dim=1)  # (B, 3)


def test_saliency_lights_only_the_pixel_the_model_reads():
    x = torch.rand(4, 3, 12, 12)
    maps = saliency(OnePixel(), x)
    assert maps.shape == (4, 12, 12)
    assert (maps[:, 5, 7] > 0).all()
    maps[:, 5, 7] = 0
    assert (maps == 0).all()


def test_saliency_differentiates_the_requested_class():
    x = torch.full((1, 3, 12, 12), 0.5)
    # Class 0's score is 3v (gradient 3), class 1's -v (|gradient| 1), class 2's v^2 (2v = 1).
    assert saliency(OnePixel(), x, torch.tensor([0]))[0, 5, 7] == pytest.approx(3.0)
    assert saliency(OnePixel(), x, torch.tensor([1]))[0, 5, 7] == pytest.approx(1.0)


class Threshold(nn.Module):
    """Class 0's score is relu(v - 0.5) of pixel (channel 0, row 3, column 4); class 1's is 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0, 3, 4]  # (B,)
        return torch.stack([torch.relu(v - 0.5), torch.zeros_like(v)], dim=1)  # (B, 2)


def test_smoothgrad_finds_the_pixel_a_plain_gradient_misses():
    x = torch.rand(2, 3, 8, 8)
    x[:, :, 0, 0], x[:, :, 7, 7] = 0.0, 1.0  # each image spans [0, 1]: noise std 0.15
    x[:, 0, 3, 4] = 0.4  # below the threshold: the plain gradient there is exactly zero
    target = torch.tensor([0, 0])
    assert (saliency(Threshold(), x, target, samples=1, noise=0.0) == 0).all()
    maps = saliency(Threshold(), x, target)  # 25 copies: P(0.4 + noise > 0.5) is about 1/4
    assert (maps[:, 3, 4] > 0.05).all()
    maps[:, 3, 4] = 0
    assert (maps == 0).all()  # and nothing else lights up


def total_variation(maps: torch.Tensor) -> torch.Tensor:
    """(B,) summed absolute neighbour differences of each (H, W) map scaled to sum 1."""
    m = maps / maps.sum(dim=(1, 2), keepdim=True)
    return (m[:, 1:] - m[:, :-1]).abs().sum((1, 2)) + (m[:, :, 1:] - m[:, :, :-1]).abs().sum((1, 2))


def test_smoothgrad_maps_are_smoother_than_plain_gradients_on_a_conv_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 5),
    )  # fmt: skip
    # Smooth images, as photos are: the speckle of a plain gradient comes from the ReLUs alone.
    x = nn.functional.interpolate(torch.rand(6, 3, 4, 4), size=24, mode="bilinear")
    plain = total_variation(saliency(net, x, samples=1, noise=0.0))
    smooth = total_variation(saliency(net, x))
    assert (smooth < plain).all()
    assert smooth.mean() < 0.9 * plain.mean()


def test_smoothgrad_runs_in_batches_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
        nn.Linear(4 * 6 * 6, 3),
    )  # fmt: skip
    sizes = []
    net.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    net.train()
    stats = net[1].running_mean.clone()
    x = torch.rand(3, 3, 8, 8)
    maps = saliency(net, x, samples=5, batch_size=4)
    assert maps.shape == (3, 8, 8) and (maps >= 0).all()
    assert sizes == [3, 4, 4, 4, 3]  # the clean pass for the top class, then 15 noisy copies
    assert net.training and torch.equal(net[1].running_mean, stats)
    assert all(p.grad is None for p in net.parameters())
    again = saliency(net, x, samples=5, batch_size=4)
    assert torch.equal(maps, again)  # the same seed draws the same noise
    assert not torch.equal(maps, saliency(net, x, samples=5, batch_size=4, seed=1))


def test_first_layer_filter_grid_has_one_tile_per_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.ReLU(), nn.Conv2d(10, 4, 3))
    weights = first_layer_filters(model)
    assert weights.shape == (10, 3, 3, 3)
    tiles = normalise_each(weights)
    grid = tile_grid(tiles, ncols=4, pad=1, scale=2)
    # 10 tiles in 4 columns -> 3 rows of 6 px tiles, 1 px borders.
    assert grid.shape == (1 + 3 * 7, 1 + 4 * 7, 3)
    for i in range(10):
        r, c = divmod(i, 4)
        tile = grid[1 + 7 * r : 7 + 7 * r, 1 + 7 * c : 7 + 7 * c]  # (6, 6, 3)
        expected = tiles[i].repeat_interleave(2, 1).repeat_interleave(2, 2).permute(1, 2, 0)
        assert torch.allclose(torch.from_numpy(tile), expected)
        assert tile.min() == 0 and tile.max() == 1  # each kernel stretched on its own
    assert (grid[1 + 7 * 2 :, 1 + 7 * 2 :] == 1).all()  # the two unused slots stay blank


def test_receptive_field_and_gradient_ascent_excite_their_channel():
    torch.manual_seed(0)
    conv2 = nn.Conv2d(4, 6, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), conv2)
    rows, cols = receptive_field(model, conv2, 15)
    assert (rows, cols) == (slice(5, 10), slice(5, 10))  # two 3x3 convs: 5x5 around the centre
    patterns = excite(model, conv2, 15, channels=6, steps=25, lr=0.2)
    assert patterns.shape == (6, 3, 5, 5)
    assert patterns.min() >= 0 and patterns.max() <= 1
    assert all(p.grad is None for p in model.parameters())  # the weights were not touched

    def centre(x):  # (C, 3, s, s) -> (C,) channel c's centre activation for image c
        out = conv2(model[1](model[0](x)))
        return out[torch.arange(6), torch.arange(6), out.shape[2] // 2, out.shape[3] // 2]

    grey = torch.full((6, 3, 5, 5), 0.5)
    with torch.no_grad():
        assert (centre(patterns) > centre(grey)).all()


@pytest.fixture
def pipeline_outputs(tmp_path, monkeypatch):
    """A fabricated run: processed data, checkpoint tied to an MLflow run, history, predictions."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    from stages.core.runlog import run_log

    fabricate.processed(tmp_path)
    fabricate.history_and_predictions(tmp_path)
    with run_log(None, run_name="fabricated") as run:
        pass
    fabricate.save_checkpoint(tmp_path / paths.CHECKPOINT, fabricate.model(), run.run_id)
    return run.run_id


def test_report_stage_writes_every_picture_and_logs_them(pipeline_outputs):
    from stages.report import report

    p = fabricate.p(
        "report.num_images=6", "report.ascent_steps=2", "report.max_channels=4",
        "report.augment_images=8",
    )  # fmt: skip
    ended = mlflow.get_run(pipeline_outputs).info
    written = report(p)
    expected = {
        "predictions.png", "mistakes.png", "filters_conv1.png", "filters_conv2.png",
        "filters_conv4.png", "augmentation.png", "curves.png", "confused_pairs.csv",
        "confused_pairs.png",
    }  # fmt: skip
    assert set(written) == expected
    assert {f.name for f in paths.REPORT.iterdir()} == expected  # nothing else, no temp dirs
    assert not list(paths.OUT.glob(".report*"))
    pairs = (paths.REPORT / "confused_pairs.csv").read_text().splitlines()
    assert pairs[0] == "actual,predicted,count,share_of_actual"
    assert pairs[1] == "one,two,2,1.0000"  # the commonest confusion first
    assert len(pairs) == 1 + 3

    client = mlflow.tracking.MlflowClient()
    logged = {a.path for a in client.list_artifacts(pipeline_outputs, "report")}
    assert logged == {f"report/{name}" for name in expected}
    assert {a.path for a in client.list_artifacts(pipeline_outputs)} == {"report"}
    now = client.get_run(pipeline_outputs).info  # added to, never reopened nor ended again
    assert (now.status, now.end_time) == ("FINISHED", ended.end_time)


def test_report_makes_only_the_chosen_pictures(pipeline_outputs):
    from stages.report import report

    assert report(fabricate.p("report.pictures=[curves, confusion]")) == [
        "confused_pairs.csv",
        "confused_pairs.png",
        "curves.png",
    ]


def test_unknown_picture_is_a_params_error():
    from stages.params import ParamsError

    with pytest.raises(
        ParamsError, match="report.pictures: must be one of: predictions, .*, got 'saliency'"
    ):
        fabricate.p("report.pictures=[saliency]")
