"""Speed settings: `precision: auto` and `memory_format: auto` follow a rule on what the
hardware can do (bf16 where it computes bf16, channels_last for conv nets), never a timing;
explicit settings are kept unless the device cannot use them; the optimizers run fused kernels."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from helpers.processes import with_store
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import nets
from stages.core.runlog import RunLog
from stages.engine import device as device_module
from stages.engine.device import Speed, bf16_in_hardware, resolve_speed

CPU = torch.device("cpu")
AVX2 = frozenset({"avx2", "fma", "avx"})  # the development machine's kind
AMX = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize(
    ("flags", "precision", "why"),
    [
        (AVX2, "fp32", "the CPU has neither avx512_bf16 nor amx_bf16: bf16 would be emulated"),
        (AVX2 | {"avx512f", "avx512_bf16"}, "bf16", "the CPU has avx512_bf16"),
        (AMX, "bf16", "the CPU has amx_bf16 and avx512_bf16"),
    ],
)
def test_auto_on_a_cpu_is_bf16_exactly_where_it_computes_bf16(flags, precision, why, monkeypatch):
    monkeypatch.setattr(device_module, "cpu_flags", lambda: flags)
    for conv, layout in ((True, "channels_last"), (False, "contiguous")):
        speed, notes = resolve_speed(CPU, "auto", "auto", has_conv=conv)
        assert (speed.precision, speed.memory_format) == (precision, layout)
        assert f"precision auto -> {precision} ({why})" in notes
        reason = "a conv net" if conv else "no convolutions"
        assert f"memory_format auto -> {layout} ({reason})" in notes
        assert speed.dtype == {"fp32": None, "bf16": torch.bfloat16}[precision]
        assert speed.channels_last == conv


@pytest.mark.parametrize("flags", [AVX2, AMX])
def test_explicit_settings_are_kept_unless_the_device_cannot_use_them(flags, monkeypatch):
    monkeypatch.setattr(device_module, "cpu_flags", lambda: flags)
    for precision in ("fp32", "bf16"):
        for layout in ("channels_last", "contiguous"):
            speed, notes = resolve_speed(CPU, precision, layout, has_conv=True)
            assert speed.label == f"{precision}/{layout}"
            assert not [n for n in notes if "auto" in n or "skipped: the model" in n]
    speed, notes = resolve_speed(CPU, "fp16", "channels_last", has_conv=False)
    assert speed.label == "fp32/contiguous"
    assert "precision fp16 skipped: CPU autocast fp16 has no speed benefit; using fp32" in notes
    assert "memory_format channels_last skipped: the model has no convolutions" in notes


def test_compile_is_kept_with_a_compiler_and_skipped_without_one(monkeypatch):
    monkeypatch.setattr(device_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    speed, notes = resolve_speed(CPU, "fp32", "contiguous", compile=True)
    assert speed.compile and not [n for n in notes if n.startswith("compile")]
    monkeypatch.setattr(device_module.shutil, "which", lambda name: None)
    speed, notes = resolve_speed(CPU, "fp32", "contiguous", compile=True)
    assert not speed.compile
    assert "compile skipped: torch.compile on the CPU needs a C++ compiler (none found)" in notes


@pytest.fixture
def gpu(monkeypatch):
    """No GPU here: what torch answers for one (`bf16`, set by the test) is stood in for, and
    what it is asked recorded; the decision built on it is the real code's. The backend flags
    resolve_speed sets for CUDA are restored after."""
    asked = {"bf16": True, "including_emulation": [], "device": []}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"].append(including_emulation)
        return asked["bf16"]

    @contextlib.contextmanager
    def on_device(device):
        asked["device"].append(device)
        yield

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", on_device)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    yield asked
    cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


@pytest.mark.parametrize("ampere", [True, False])
def test_auto_on_a_gpu_asks_torch_about_that_gpu_without_emulation(ampere, gpu):
    gpu["bf16"] = ampere
    cuda1 = torch.device("cuda", 1)
    speed, notes = resolve_speed(cuda1, "auto", "auto", cudnn_benchmark=False, has_conv=True)
    # Emulated bf16 (a GPU before Ampere) runs slower than fp32: it does not count.
    assert gpu["including_emulation"] == [False] and gpu["device"] == [cuda1]
    assert speed.label == ("bf16/channels_last" if ampere else "fp32/channels_last")
    why = "the GPU computes bf16" if ampere else "the GPU has no bf16 in hardware"
    assert f"precision auto -> {speed.precision} ({why})" in notes
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.allow_tf32
    assert not [n for n in notes if "cudnn_benchmark" in n]
    speed, notes = resolve_speed(cuda1, "fp16", "contiguous", has_conv=True)
    assert speed.label == "fp16/contiguous" and notes == []  # fp16 pays on a GPU: kept
    assert torch.backends.cudnn.benchmark is True
    assert len(gpu["device"]) == 1  # an explicit precision asks nothing


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


# With AMX faked on a CPU without it, bf16 runs emulated: slow.
SLOW_BF16 = () if bf16_in_hardware(CPU) else pytest.mark.slow


@pytest.mark.parametrize("flags", [AVX2, pytest.param(AMX, marks=SLOW_BF16)])
def test_the_train_stage_says_what_it_chose_and_why_and_records_it(
    flags, tmp_path, monkeypatch, capsys
):
    """The first line train prints names the decision and its reason, run.json records it, and
    nothing is read from or written to the home or cache folders."""
    from helpers.fabricate import make_processed, write_params

    from stages import params
    from stages import train as train_module

    monkeypatch.setattr(device_module, "cpu_flags", lambda: flags)
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    (cache / "convnet-pipeline").mkdir(parents=True)
    (cache / "convnet-pipeline/speed.json").write_text('{"alexnet": "fp32/contiguous"}')
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    make_processed(tmp_path, n_train=32, n_val=8)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    monkeypatch.setattr(RunLog, "model", lambda *args: None)  # no MLflow model: not checked
    write_params(tmp_path, "alexnet", epochs=1, precision="auto", memory_format="auto")
    train_module.train(params.load("params.yaml", ["net.fc_width=16"]))
    banner = capsys.readouterr().out.splitlines()[0]
    precision = "bf16" if flags == AMX else "fp32"
    assert f"; {precision}, channels_last (precision auto -> {precision} (the CPU " in banner
    assert "memory_format auto -> channels_last (a conv net)" in banner
    ran = json.loads((tmp_path / "out/train/run.json").read_text())
    assert (ran["precision"], ran["memory_format"]) == (precision, "channels_last")
    assert list(home.iterdir()) == []
    assert [f.name for f in cache.rglob("*") if f.is_file()] == ["speed.json"]


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
