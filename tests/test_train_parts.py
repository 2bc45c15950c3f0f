"""Losses against hand-computed values, schedules step by step, histograms, EMA bookkeeping."""

import math

import pytest
import torch
from helpers.fabricate import train_settings
from torch import nn

from stages.data.augment import augment
from stages.engine.device import resolve_speed
from stages.engine.loop import steps_per_epoch
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


def test_an_epoch_is_whole_global_batches_at_least_one():
    assert steps_per_epoch(10, 4, 1) == 2  # the 2 images left over wait for the next epoch
    assert steps_per_epoch(100, 10, 3) == 11  # global batch 9: 3 ranks of 3
    assert steps_per_epoch(3, 8, 1) == steps_per_epoch(3, 8, 4) == 1  # a batch of them all


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


def test_linear_decays_to_zero_after_the_warmup():
    t = train_settings(epochs=5, schedule="linear", warmup_epochs=1)
    assert rates(t, 1) == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.25])
    t = train_settings(epochs=2, schedule="linear", warmup_epochs=0)
    assert rates(t, 2) == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_the_schedule_sets_the_rates_multiplier_gives():
    t = train_settings(lr=0.4, epochs=3, schedule="cosine", warmup_epochs=1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched = Schedule(opt, t, steps_per_epoch=2)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        assert sched.lr == seen[-1]
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.4 * m for m in rates(t, 2)])


def _plateau(t: TrainParams) -> tuple[torch.optim.Optimizer, Schedule]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=t.lr)
    return opt, Schedule(opt, t, steps_per_epoch=1)


def test_plateau_cuts_after_patience_and_is_checkpointable():
    t = train_settings(lr=1.0, schedule="plateau", plateau_patience=2, plateau_factor=0.1,
                    warmup_epochs=0)  # fmt: skip
    opt, sched = _plateau(t)
    seen = []
    for top1 in [0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.7]:
        opt.step()
        sched.step()
        sched.epoch_end(top1)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])
    # As RunState resumes: the optimizer's state holds the rate, the schedule's the counts.
    opt2, again = _plateau(t)
    opt2.load_state_dict(opt.state_dict())
    again.load_state_dict(sched.state_dict())
    for top1 in [0.7, 0.7]:
        for s, o in ((sched, opt), (again, opt2)):
            o.step()
            s.step()
            s.epoch_end(top1)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.001)


def test_plateau_counts_from_the_end_of_the_warmup():
    t = train_settings(lr=1.0, epochs=6, schedule="plateau", plateau_patience=1,
                    plateau_factor=0.5, warmup_epochs=2)  # fmt: skip
    opt, sched = _plateau(t)
    seen = []
    # Epoch 2 ends the warm-up: its 0.4 is the first score counted, not a fall from 0.5.
    for top1 in [0.5, 0.4, 0.6, 0.6, 0.7, 0.7]:
        opt.step()
        sched.step()
        sched.epoch_end(top1)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.25])


def test_a_schedule_saved_before_torchs_schedulers_resumes():
    """last.pt's schedule state as it was written before (step count, plateau counts)."""
    t = train_settings(lr=1.0, epochs=4, schedule="cosine", warmup_epochs=0)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched = Schedule(opt, t, steps_per_epoch=1)
    sched.load_state_dict({"step_count": 2, "plateau": 1.0, "best": 0.5, "bad_epochs": 0})
    opt.step()
    sched.step()
    assert sched.lr == pytest.approx(rates(t, 1)[3])
    t = train_settings(lr=1.0, schedule="plateau", plateau_patience=2, warmup_epochs=0,
                    plateau_factor=0.1)  # fmt: skip
    opt, sched = _plateau(t)
    sched.load_state_dict({"step_count": 3, "plateau": 1.0, "best": 0.6, "bad_epochs": 1})
    opt.step()
    sched.step()
    sched.epoch_end(0.6)  # the second epoch without a gain
    assert sched.lr == pytest.approx(0.1)


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
