"""Losses against hand-computed values, schedules step by step, histograms, EMA bookkeeping."""

import math

import pytest
import torch
from helpers.fabricate import train_settings
from torch import nn

from stages.data.augment import augment
from stages.engine.device import resolve_speed
from stages.engine.losses import make_loss
from stages.engine.schedules import Schedule, multiplier
from stages.explain import histograms
from stages.params import TrainParams

LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
LABELS = torch.tensor([0, 1])


def test_cross_entropy_by_hand():
    # sample 1: log(e^2+e^1+e^0) - 2; sample 2: log(2 + e^3) - 0
    expected = (math.log(math.e**2 + math.e + 1) - 2 + math.log(2 + math.e**3)) / 2
    assert make_loss("cross_entropy")(LOGITS, LABELS).item() == pytest.approx(expected)


def test_smoothed_cross_entropy_by_hand():
    eps, k = 0.3, 3
    total = 0.0
    for z, y in zip(LOGITS.tolist(), LABELS.tolist(), strict=True):
        logz = math.log(sum(math.exp(v) for v in z))
        logp = [v - logz for v in z]
        target = [eps / k + (1 - eps) * (i == y) for i in range(k)]
        total += -sum(q * lp for q, lp in zip(target, logp, strict=True))
    assert make_loss("cross_entropy", eps)(LOGITS, LABELS).item() == pytest.approx(total / 2)


def test_multiclass_hinge_by_hand():
    # sample 1 (y=0, s=2): max(0,1-2+1)=0, max(0,0-2+1)=0 -> 0
    # sample 2 (y=1, s=0): max(0,0-0+1)=1, max(0,3-0+1)=4 -> 5
    assert make_loss("hinge")(LOGITS, LABELS).item() == pytest.approx(2.5)


def rates(t: TrainParams, steps_per_epoch: int) -> list[float]:
    return [multiplier(t, steps_per_epoch, s) for s in range(t.epochs * steps_per_epoch)]


def test_step_schedule_divides_by_ten_every_step_epochs():
    t = train_settings(epochs=6, schedule="step", step_epochs=2, warmup_epochs=0)
    assert rates(t, 2) == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01])


def test_cosine_with_linear_warmup():
    t = train_settings(epochs=3, schedule="cosine", warmup_epochs=1)
    r = rates(t, 2)  # warm-up (1/2, 2/2), then cosine over the 4 remaining steps
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert r == pytest.approx(expected)


def test_onecycle_rises_then_falls_linearly():
    t = train_settings(epochs=3, schedule="onecycle", warmup_epochs=1)
    assert rates(t, 2) == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_plateau_cuts_after_patience_and_is_checkpointable():
    t = train_settings(lr=1.0, schedule="plateau", plateau_patience=2, plateau_factor=0.1,
                    warmup_epochs=0)  # fmt: skip
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = Schedule(opt, t, steps_per_epoch=1)
    seen = []
    for top1 in [0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.7]:
        sched.step()
        sched.epoch_end(top1)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])
    again = Schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), t, 1)
    again.load_state_dict(sched.state_dict())
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_histograms_report_dead_relus_per_layer():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[1].bias.fill_(-100.0)  # every unit dead: ReLU outputs all zeros
    metrics, samples = histograms.layer_statistics(model, torch.rand(5, 3, 2, 2))
    assert metrics["act/2/zero_frac"] == 1.0 and metrics["act/1/mean"] < -50
    assert {"weight/1.weight/std", "act/3/std"} <= metrics.keys()
    fig = histograms.plot(samples, "t")
    assert len(fig.axes) >= len(samples)


def test_memory_format_auto_is_channels_last_for_conv_nets_and_inputs_follow():
    cpu = torch.device("cpu")
    conv, notes = resolve_speed(cpu, "auto", "auto", has_conv=True)
    flat, _ = resolve_speed(cpu, "auto", "auto", has_conv=False)
    forced, _ = resolve_speed(cpu, "auto", "contiguous", has_conv=True)
    assert conv.channels_last and not flat.channels_last and not forced.channels_last
    assert "memory_format auto -> channels_last (a conv net)" in notes
    images = torch.randint(0, 256, (4, 12, 12, 3), dtype=torch.uint8)
    x = augment(images, 8, 0, True, torch.Generator().manual_seed(0))  # (4, 3, 8, 8)
    assert conv.inputs(x).is_contiguous(memory_format=torch.channels_last)
    assert forced.inputs(x).is_contiguous() and torch.equal(forced.inputs(x), x)
