"""Stage 3, train: one model on one dataset, data and augmentation on the training device.

Writes out/train/model.pt (once training finished) and out/train/history.csv (one row per
epoch, for `dvc plots`), logs everything to one MLflow run, and keeps two more checkpoints
outside DVC's outputs: last.pt (every epoch; a killed run resumes from it) and best.pt (the
epoch with the best validation top-1). Under torchrun every rank trains on its shard of the
data with DistributedDataParallel; rank 0 alone logs and writes files.
"""

from __future__ import annotations

import contextlib
import csv
import time

import mlflow
import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stages.core import checkpoint, paths, tracking
from stages.core.files import atomic_path
from stages.data.augment import center_crop
from stages.data.processed import load_processed
from stages.engine import distributed, pretrained
from stages.engine.device import Speed, has_conv, prepare, resolve_device, resolve_speed
from stages.engine.distributed import Dist
from stages.engine.loop import Engine, TrainingError, train_one_epoch, validate
from stages.engine.losses import make_loss
from stages.engine.model import build_model
from stages.engine.optim import make_optimizer
from stages.engine.schedules import Schedule
from stages.explain import histograms
from stages.params import Params, flatten


def _write_history(rows: list[dict]) -> None:
    with atomic_path(paths.HISTORY) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _log_model(model: nn.Module, size: int) -> None:
    model = model.cpu().eval()
    # Batch of 2: torch.export fixes a size-1 dimension, and the model must take any batch size.
    example = np.zeros((2, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, output)
    # Naming the requirements skips MLflow's inference of them (a subprocess: ~10 s a run).
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    mlflow.pytorch.log_model(
        model, name="model", input_example=example, signature=signature,
        pip_requirements=requirements,
    )  # fmt: skip


def _resume_state(p: Params, d: Dist, data_info: dict) -> dict | None:
    """last.pt when it is an unfinished run with exactly these params and data, else None."""
    if not p.train.resume or not paths.LAST.exists():
        return None
    try:
        state = checkpoint.load(paths.LAST)
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(
            f"{err}; delete it, or set train.resume=false to overwrite it"
        ) from None
    old, new = flatten(state.get("params", {})), flatten(p.to_dict())
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    reason = (
        f"params differ ({', '.join(changed[:3])})" if changed
        else "it is a finished run" if state.get("complete")
        else "the processed data differ" if state.get("data") != data_info
        else f"it was trained on {state.get('world')} processes" if state.get("world") != d.world
        else None
    )  # fmt: skip
    if reason:
        if d.main:
            print(f"train: not resuming from {paths.LAST}: {reason}; starting fresh")
        return None
    return state


def _mlflow_run(d: Dist, run_id: str | None, p: Params) -> contextlib.AbstractContextManager:
    """Rank 0's MLflow run (the interrupted one when resuming); other ranks log nothing."""
    if not d.main:
        return contextlib.nullcontext()
    if run_id:
        tracking.setup()
        try:
            mlflow.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            print(f"train: MLflow run {run_id} is not in this store; starting a new run")
            run_id = None
    if run_id:
        return tracking.run(run_id=run_id)
    return tracking.run(run_name=p.model, tags=tracking.run_tags(p.dataset, p.model))


def train(p: Params) -> dict[str, float]:
    """Train `p.model` on the preprocessed data; returns the last epoch's metrics."""
    d, device = distributed.setup(resolve_device(p.train.device))
    try:
        return _train(p, d, device)
    except torch.OutOfMemoryError:
        raise TrainingError(
            f"out of memory on {device} with train.batch_size {p.train.batch_size}"
            f" ({max(1, p.train.batch_size // d.world)} per device); lower train.batch_size"
            " (or evaluate.batch_size for validation)"
        ) from None
    finally:
        distributed.cleanup(d)


def _train(p: Params, d: Dist, device: torch.device) -> dict[str, float]:
    t = p.train
    torch.manual_seed(p.seed)
    data = load_processed(p.preprocess_inputs())
    shard, n_total = d.shard(len(data.train_labels)), len(data.train_labels)
    images = torch.from_numpy(np.array(data.train_images[shard])).to(device)  # (N/world,H,W,3)
    labels = torch.from_numpy(data.train_labels[shard]).to(device)  # (N / world,)
    val_images, val_labels = data.val_images[d.shard(len(data.val_labels))], data.val_labels
    val_labels = val_labels[d.shard(len(val_labels))]
    raw = build_model(p, data)
    raw = pretrained.initialise(raw, p)  # train.init: scratch | pretrained | PATH
    speed, notes = resolve_speed(
        device, t.precision, t.memory_format, t.compile, t.cudnn_benchmark, has_conv(raw)
    )
    raw = prepare(raw, speed)
    net = distributed.wrap(raw, d, device, t.sync_batchnorm)
    raw = net.module if d.world > 1 else raw  # SyncBatchNorm conversion made a new module
    if speed.compile:
        net = torch.compile(net)
    cuda = device.type == "cuda"
    optimizer = make_optimizer(raw, t, fused=True if cuda else None)
    per_rank = max(1, t.batch_size // d.world)  # train.batch_size is the global batch
    steps = max(1, n_total // d.world // per_rank)
    ema = None
    if t.ema_decay:
        ema = AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
    e = Engine(
        net, raw, optimizer, Schedule(optimizer, t, steps), make_loss(t.loss, t.label_smoothing),
        torch.amp.GradScaler(device.type, enabled=speed.dtype == torch.float16), ema, speed, d,
        torch.Generator(device=device).manual_seed(p.seed + d.rank),
    )  # fmt: skip

    history: list[dict] = []
    best, since_best, start = -1.0, 0, 1
    state = _resume_state(p, d, data.info)
    if state is not None:
        raw.load_state_dict(state["raw_model"])
        optimizer.load_state_dict(state["optimizer"])
        e.schedule.load_state_dict(state["schedule"])
        e.scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
        e.generator.set_state(state["rng"]["generator"].to(e.generator.get_state().device))
        if cuda and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        history, best, since_best = state["history"], state["best"], state["since_best"]
        start = state["epoch"] + 1
    if d.main:
        print(
            f"train: {p.model} ({sum(q.numel() for q in raw.parameters()):,} parameters) on"
            f" {p.dataset}: {n_total} images, {t.epochs} epochs, device {device}"
            f"{f' x {d.world} processes' if d.world > 1 else ''}; {speed.precision},"
            f" {'channels_last' if speed.channels_last else 'contiguous'}"
            f"{', compiled' if speed.compile else ''} ({'; '.join(notes)})"
            + (f"; resuming at epoch {start}" if state else "")
        )

    def snapshot(epoch: int, complete: bool) -> dict:
        """The checkpoint: model.pt's keys (result weights: EMA when on) + resume state."""
        result = ema.module if ema is not None else raw
        return {
            "net": p.model, "net_options": p.net_options, "num_classes": len(data.classes),
            "image_size": t.crop_size, "stored_size": data.image_size, "classes": data.classes,
            "precision": speed.precision,
            "memory_format": "channels_last" if speed.channels_last else "contiguous",
            "params": p.to_dict(),
            "epoch": epoch, "model": result.state_dict(), "raw_model": raw.state_dict(),
            "optimizer": optimizer.state_dict(), "schedule": e.schedule.state_dict(),
            "scaler": e.scaler.state_dict(), "ema": ema.state_dict() if ema else None,
            "rng": {"torch": torch.get_rng_state(), "generator": e.generator.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if cuda else None},
            "history": history, "metrics": history[-1] if history else {}, "best": best,
            "since_best": since_best, "mlflow_run_id": run_id, "data": data.info,
            "world": d.world, "complete": complete,
        }  # fmt: skip

    hist_batch = center_crop(torch.from_numpy(np.array(data.val_images[:256])), t.crop_size)
    with _mlflow_run(d, state["mlflow_run_id"] if state else None, p) as run:
        run_id = run.info.run_id if d.main else None
        if d.main:
            mlflow.log_params(flatten(p.to_dict()))
            if state:
                mlflow.set_tag("resumed_from_epoch", str(start - 1))
            else:  # files preprocess skipped (skip_bad_images); a resumed run logged it already
                mlflow.log_metric("data_skipped_images", data.info.get("skipped_images", 0))
        for epoch in range(start, t.epochs + 1):
            if d.main and t.histogram_every and (epoch - 1) % t.histogram_every == 0:
                _log_histograms(raw, hist_batch.to(device), speed, epoch - 1)
            pretrained.freeze_body(raw, frozen=epoch <= t.freeze_epochs)
            lr = e.schedule.lr
            tic = time.perf_counter()
            row = train_one_epoch(e, images, labels, t, epoch)
            seconds = time.perf_counter() - tic
            vb = p.evaluate.batch_size
            row |= validate(raw, val_images, val_labels, t.crop_size, vb, speed, d)
            if ema is not None:
                row |= validate(
                    ema.module, val_images, val_labels, t.crop_size, vb, speed, d, "ema_val_"
                )
            score = row["ema_val_top1" if ema is not None else "val_top1"]
            e.schedule.epoch_end(score)
            improved = score > best
            best, since_best = (score, 0) if improved else (best, since_best + 1)
            row |= {"lr": lr, "epoch_seconds": seconds}
            row["images_per_second"] = steps * per_rank * d.world / seconds
            history.append({"epoch": epoch, **row})
            stop = t.patience and since_best >= t.patience
            if d.main:
                _write_history(history)
                mlflow.log_metrics(row, step=epoch)
                state_now = snapshot(epoch, complete=False)
                checkpoint.save(paths.LAST, state_now)
                if improved:
                    checkpoint.save(paths.BEST, state_now)
                print(
                    f"epoch {epoch:3d}/{t.epochs}  loss {row['train_loss']:.4f}"
                    f"  train {row['train_top1']:.2%}  val loss {row['val_loss']:.4f}"
                    f"  val top-1 {row['val_top1']:.2%}  top-5 {row['val_top5']:.2%}"
                    f"  lr {lr:.2e}  {row['images_per_second']:.0f} img/s",
                    flush=True,
                )
                if stop:
                    print(f"train: early stop, no val top-1 gain for {t.patience} epochs")
            if stop:
                break
        if d.main:
            final = snapshot(history[-1]["epoch"], complete=True)
            checkpoint.save(paths.CHECKPOINT, final)
            checkpoint.save(paths.LAST, final)
            mlflow.log_artifact(str(paths.HISTORY))
            mlflow.log_artifact(str(paths.PROCESSED / "mean.png"))
            _log_model(ema.module if ema is not None else raw, t.crop_size)
    return history[-1]


def _log_histograms(model: nn.Module, x: torch.Tensor, speed: Speed, epoch: int) -> None:
    """Per-layer weight/activation statistics as MLflow metrics and a PNG (rank 0)."""
    metrics, samples = histograms.layer_statistics(model, speed.inputs(x))
    mlflow.log_metrics(metrics, step=epoch)
    fig = histograms.plot(samples, f"activations after epoch {epoch}")
    mlflow.log_figure(fig, f"histograms/epoch_{epoch:03d}.png")
