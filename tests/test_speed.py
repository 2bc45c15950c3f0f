"""Speed settings: `precision: auto` and `memory_format: auto` decide per machine, from what
the device can do and, where that leaves more than one candidate, from a measurement on the
model (cached); the optimizers run fused kernels."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.processes import with_store
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import nets
from stages.core.runlog import RunLog
from stages.engine import device as device_module
from stages.engine.device import Speed, cached_rates, resolve_speed, step_rates

CPU = torch.device("cpu")
AVX2 = frozenset({"avx2", "fma", "avx"})  # the development machine's kind
AMX = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def fake(rates: dict[str, float]):
    """A measurement that returns `rates` by label and records what it was asked."""
    asked: list[list[str]] = []

    def measure(candidates: list[Speed]) -> dict[Speed, float]:
        asked.append([s.label for s in candidates])
        return {s: rates[s.label] for s in candidates}

    return measure, asked


def test_without_bf16_hardware_auto_stays_fp32_and_measures_only_the_layout(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_flags", lambda: AVX2)
    measure, asked = fake({"fp32/channels_last": 100.0, "fp32/contiguous": 300.0})
    speed, notes = resolve_speed(CPU, "auto", "auto", has_conv=True, measure=measure)
    assert asked == [["fp32/channels_last", "fp32/contiguous"]]  # bf16 never tried
    assert (speed.precision, speed.memory_format) == ("fp32", "contiguous")
    assert "precision auto -> fp32 (no bf16 in hardware)" in notes
    assert any("fp32/contiguous 300" in n for n in notes)


def test_with_bf16_hardware_the_measured_fastest_wins(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_flags", lambda: AMX)
    rates = {"fp32/channels_last": 199.0, "fp32/contiguous": 150.0,
             "bf16/channels_last": 320.0, "bf16/contiguous": 210.0}  # fmt: skip
    measure, asked = fake(rates)
    speed, notes = resolve_speed(CPU, "auto", "auto", has_conv=True, measure=measure)
    assert sorted(asked[0]) == sorted(rates)
    assert speed.label == "bf16/channels_last"
    assert "precision auto -> bf16 (bf16 in hardware)" in notes


def test_a_gain_within_the_noise_keeps_the_first_candidate(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_flags", lambda: AMX)
    measure, _ = fake({"fp32/channels_last": 200.0, "bf16/channels_last": 204.0,
                       "fp32/contiguous": 100.0, "bf16/contiguous": 100.0})  # fmt: skip
    speed, _ = resolve_speed(CPU, "auto", "auto", has_conv=True, measure=measure)
    assert speed.label == "fp32/channels_last"


def test_what_params_fix_or_the_model_rules_out_is_not_measured(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_flags", lambda: AMX)
    measure, asked = fake({})
    speed, _ = resolve_speed(CPU, "bf16", "contiguous", has_conv=True, measure=measure)
    assert asked == [] and speed.label == "bf16/contiguous"
    measure, asked = fake({"fp32/contiguous": 1.0, "bf16/contiguous": 2.0})
    speed, _ = resolve_speed(CPU, "auto", "auto", has_conv=False, measure=measure)
    assert asked == [["fp32/contiguous", "bf16/contiguous"]] and speed.label == "bf16/contiguous"
    monkeypatch.setattr(device_module, "cpu_flags", lambda: AVX2)
    measure, asked = fake({})
    speed, _ = resolve_speed(CPU, "auto", "auto", has_conv=False, measure=measure)
    assert asked == [] and speed.label == "fp32/contiguous"  # one candidate: nothing to measure


def test_measurements_are_cached_per_machine_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measure, asked = fake({"fp32/channels_last": 100.0, "fp32/contiguous": 300.0})
    candidates = [Speed(CPU, None, True), Speed(CPU, None, False)]
    first = cached_rates("resnet18, batch 128, 56 px", measure)(candidates)
    again = cached_rates("resnet18, batch 128, 56 px", measure)(candidates)
    assert first == again and len(asked) == 1
    cached_rates("resnet50, batch 128, 56 px", measure)(candidates)
    assert len(asked) == 2  # another model: measured
    cache = tmp_path / "convnet-pipeline" / "speed.json"
    assert len(json.loads(cache.read_text())) == 2
    cache.write_text("{not json")
    cached_rates("resnet18, batch 128, 56 px", measure)(candidates)
    assert len(asked) == 3 and len(json.loads(cache.read_text())) == 1  # remade


def test_a_cache_that_cannot_be_written_costs_only_the_measurement(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # a file where a folder should be
    measure, asked = fake({"fp32/channels_last": 1.0, "fp32/contiguous": 2.0})
    candidates = [Speed(CPU, None, True), Speed(CPU, None, False)]
    assert cached_rates("k", measure)(candidates)[candidates[1]] == 2.0


def test_the_measurement_is_real_and_leaves_the_model_and_the_random_state_alone():
    torch.manual_seed(3)
    model = nets.build("alexnet", 4, 16, fc_width=8, batch_norm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    candidates = [Speed(CPU, None, True), Speed(CPU, None, False)]
    rates = step_rates(model, candidates, batch=4, size=16, rounds=1)
    assert set(rates) == set(candidates) and all(r > 0 for r in rates.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)


def test_bf16_training_keeps_weights_optimizer_state_norm_statistics_and_ema_in_fp32():
    torch.manual_seed(0)
    model = nets.build("alexnet", 4, 16, fc_width=8, batch_norm=True)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    speed = Speed(CPU, torch.bfloat16, True)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for _ in range(2):
        with speed.autocast():
            logits = model(speed.inputs(x))
            loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
    assert logits.dtype == torch.bfloat16  # the arithmetic ran in bf16
    floats = [*model.parameters(), *model.buffers(), *ema.parameters(), *ema.buffers()]
    floats += [s["momentum_buffer"] for s in optimizer.state.values()]
    assert all(t.dtype == torch.float32 for t in floats if t.is_floating_point())
    assert torch.isfinite(loss)


# With AMX faked on a CPU without it, the bf16 candidates run emulated: slow.
@pytest.mark.parametrize("flags", [AVX2, pytest.param(AMX, marks=pytest.mark.slow)])
def test_the_train_stage_says_what_it_chose_and_why(flags, tmp_path, monkeypatch, capsys):
    from helpers.fabricate import make_processed, write_params

    from stages import params
    from stages import train as train_module

    monkeypatch.setattr(device_module, "cpu_flags", lambda: flags)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    make_processed(tmp_path, n_train=32, n_val=8)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    monkeypatch.setattr(RunLog, "model", lambda *args: None)  # no MLflow model: not measured
    small = ["net.fc_width=16"]
    write_params(tmp_path, "alexnet", epochs=1, precision="auto", memory_format="auto")
    train_module.train(params.load("params.yaml", small))  # 2 steps: not worth measuring
    assert "measured" not in capsys.readouterr().out.splitlines()[0]
    monkeypatch.setattr(train_module, "MEASURED_RUNS", 2)
    write_params(tmp_path, "alexnet", epochs=1, precision="auto", memory_format="auto",
                 resume=False)  # fmt: skip
    train_module.train(params.load("params.yaml", small))
    banner = capsys.readouterr().out.splitlines()[0]
    assert "measured images/s: fp32/channels_last" in banner
    assert ("bf16/contiguous" in banner) == (flags == AMX)
    assert (tmp_path / "cache/convnet-pipeline/speed.json").is_file()


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "adagrad"])
def test_optimizers_are_fused_and_step_as_the_plain_loop_does(kind):
    """Fused kernels are a speed change only: the same steps as torch's per-tensor loop."""
    from helpers.fabricate import train_settings

    from stages.engine.optim import make_optimizer

    t = train_settings(optimizer=kind, lr=0.1, weight_decay=0.1)
    torch.manual_seed(0)
    fast_model = nets.build("alexnet", 4, 16, fc_width=8, dropout=0.0)
    plain_model = nets.build("alexnet", 4, 16, fc_width=8, dropout=0.0)
    plain_model.load_state_dict(fast_model.state_dict())
    fast = make_optimizer(fast_model, t)
    assert fast.defaults.get("fused") is True
    groups = [
        {"params": [q for q in plain_model.parameters() if q.ndim > 1], "weight_decay": 0.1},
        {"params": [q for q in plain_model.parameters() if q.ndim <= 1], "weight_decay": 0.0},
    ]
    extra = {"momentum": t.momentum, "nesterov": t.nesterov} if kind == "sgd" else {}
    plain = type(fast)(groups, lr=0.1, foreach=False, **extra)
    x, y = torch.rand(6, 3, 16, 16), torch.randint(0, 4, (6,))
    start = torch.cat([q.detach().flatten() for q in plain_model.parameters()])
    for model, optimizer in ((fast_model, fast), (plain_model, plain)):
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    moved = {
        name: torch.cat([q.detach().flatten() for q in model.parameters()]) - start
        for name, model in (("fast", fast_model), ("plain", plain_model))
    }
    # The same updates up to the order of float operations (Adam's division by a near-zero
    # second moment can amplify that in a few weights: compare the whole update).
    gap = (moved["fast"] - moved["plain"]).norm() / moved["plain"].norm()
    assert gap < 1e-3, gap
