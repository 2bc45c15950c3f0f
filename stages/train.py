"""Stage 3, train: one model on one dataset, data and augmentation on the training device.

Writes out/train/model.pt (what inference needs) and out/train/history.csv (one row per
epoch, for `dvc plots`) once, when training finished; logs everything to one MLflow run, epoch
by epoch. Two more checkpoints stay outside DVC's outputs: last.pt (every epoch: the model plus
the run's state, `RunState`, with the history so far; a killed run resumes from it) and best.pt
(the same, at the epoch with the best validation top-1). stages.core.checkpoint defines what
each file holds. Under torchrun every rank trains on its shard of the data with
DistributedDataParallel; rank 0 alone logs and writes files.
"""

from __future__ import annotations

import contextlib
import csv

import mlflow
import numpy as np
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stages.core import checkpoint, paths, tracking
from stages.core.errors import Interrupted
from stages.core.files import atomic_path, write_json
from stages.data.augment import center_crop
from stages.data.processed import Processed, load_processed
from stages.data.sources import SOURCES
from stages.data.writer import digest
from stages.engine import distributed, pretrained
from stages.engine.device import Speed, has_conv, prepare, resolve_device, resolve_speed
from stages.engine.distributed import Dist
from stages.engine.loop import Engine, TrainingError, run_epoch
from stages.engine.losses import make_loss
from stages.engine.model import build_model
from stages.engine.optim import make_optimizer
from stages.engine.schedules import Schedule
from stages.engine.state import RunState
from stages.explain import histograms
from stages.params import MODEL_TUNED, Params, flatten

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _write_history(rows: list[dict]) -> None:
    with atomic_path(paths.HISTORY) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _log_model(model: nn.Module, p: Params, classes: list[str]) -> None:
    """The trained network as an MLflow model named `<dataset>-<model>` (registered under
    `convnet-<dataset>-<model>` with train.register_model), its classes in the metadata."""
    # Contiguous weights: torch.export cannot pack channels_last ones ("No complete tensor").
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    size = p.train.crop_size
    # Batch of 2: torch.export fixes a size-1 dimension, and the model must take any batch size.
    example = np.zeros((2, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, output)
    # Naming the requirements skips MLflow's inference of them (a subprocess: ~10 s a run).
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    metadata = {
        "classes": classes,
        "input": f"float32 (batch, 3, {size}, {size}): RGB in [0, 1], channels first",
        "output": f"float32 (batch, {len(classes)}): logits, in the order of `classes`",
        "dataset": p.dataset,
        "model": p.model,
    }
    name = f"{p.dataset}-{p.model}"
    mlflow.pytorch.log_model(
        model, name=name, input_example=example, signature=signature,
        pip_requirements=requirements, metadata=metadata,
        registered_model_name=f"convnet-{name}" if p.train.register_model else None,
    )  # fmt: skip


def _log_data(p: Params, data: Processed) -> None:
    """The training and validation sets as MLflow dataset inputs: the UI's Dataset column."""
    spec = SOURCES[p.dataset]
    # Where download fetches it first (the mirror, when params name one), your folder, or the
    # code that made it.
    origin = spec.origin(p.download)
    if origin is None:
        source = CodeDatasetSource({"description": spec.description})
    elif "://" in origin:
        source = origin
    else:
        source = str((tracking.root() / origin).resolve())
    digests = data.info.get("digests", {})  # data made before digests were recorded: compute
    for split, context in (("train", "training"), ("val", "validation")):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        found = digests.get(split) or digest(images, labels)
        dataset = mlflow.data.from_numpy(
            images, source=source, targets=labels, name=p.dataset, digest=found
        )
        mlflow.log_input(dataset, context=context)


def _resume_state(p: Params, d: Dist, data_info: dict) -> dict | None:
    """last.pt when it is an unfinished run with exactly these params and data, else None."""
    if not p.train.resume or not paths.LAST.exists():
        return None
    try:
        state = checkpoint.load(
            paths.LAST, require=checkpoint.INFERENCE_KEYS + checkpoint.RESUME_KEYS
        )
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(
            f"{err}; delete it, or set train.resume=false to overwrite it"
        ) from None
    old, new = flatten(state["params"]), flatten(p.to_dict())
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    reason = (
        f"params differ ({', '.join(changed[:3])})" if changed
        else "it is a finished run" if state["complete"]
        else "the processed data differ" if state["data"] != data_info
        else f"it was trained on {state['world']} processes" if state["world"] != d.world
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
    return tracking.run(
        run_name=tracking.run_name(p.dataset, p.model),
        tags=tracking.run_tags(p.dataset, p.model, source="stages/train.py"),
    )


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
    """The run: set up (or resume), one epoch at a time, then the results (rank 0 writes)."""
    t = p.train
    torch.manual_seed(p.seed)
    data = load_processed(p.preprocess_inputs())
    train_set, val_set = _shards(data, d, device)
    e, s, notes = _build(p, d, device, data)
    # Rank 0 decides, from its last.pt, for every rank (other nodes may not share out/).
    saved = distributed.from_main(d, _resume_state(p, d, data.info) if d.main else None)
    if saved is not None:
        s.load_state_dict(saved)
    if d.main:
        resume_at = s.epoch + 1 if saved is not None else None
        print(_banner(p, e, notes, len(data.train_labels), resume_at))
    sample = center_crop(torch.from_numpy(np.array(data.val_images[:256])), t.crop_size)
    with _mlflow_run(d, s.mlflow_run_id, p) as run:
        if d.main:
            s.mlflow_run_id = run.info.run_id
            _log_start(p, e, data, resumed_from=s.epoch if saved is not None else None)
            tracking.system_metrics(device)  # starts the CPU-use interval of the first epoch
        saved = s.epoch  # the epoch last.pt holds
        try:
            for epoch in range(s.epoch + 1, t.epochs + 1):
                if t.patience and s.since_best >= t.patience:
                    break  # stopped early (in this process, or before the kill it resumes from)
                if d.main and t.histogram_every and (epoch - 1) % t.histogram_every == 0:
                    _log_histograms(s.model, sample.to(device), e.speed, epoch - 1)
                pretrained.freeze_body(s.model, frozen=epoch <= t.freeze_epochs)
                row = run_epoch(e, train_set, val_set, t, p.evaluate.batch_size, epoch)
                improved = s.end_epoch(epoch, row)
                if d.main:
                    with tracking.shielded():
                        mlflow.log_metrics(row | tracking.system_metrics(device), step=epoch)
                    state = _inference(p, data, e.speed, s).to_dict() | s.state_dict()
                    checkpoint.save(paths.LAST, state)
                    saved = epoch
                    if improved:
                        checkpoint.save(paths.BEST, state)
                    print(_progress(epoch, t.epochs, row, t.patience, s.since_best), flush=True)
        except Interrupted as err:  # say how far training got and how to go on
            raise Interrupted(err.signum, _stopped(s.epoch, saved, t.epochs)) from None
        if d.main:
            _finish(p, data, e.speed, s)
    return s.metrics


def _stopped(reached: int, saved: int, epochs: int) -> str:
    """Where an interrupted training stands and how to go on."""
    kept = (
        f"{paths.LAST} holds epoch {saved}: run the same command again to resume there"
        if saved else "no epoch was saved yet, so running again starts over"
    )  # fmt: skip
    return f"training stopped in epoch {reached + 1} of {epochs}; {kept}"


def _shards(data: Processed, d: Dist, device: torch.device) -> tuple[tuple, tuple]:
    """The training images (uint8 (N, H, W, 3) on `device`: every rank draws its part of
    each batch from the whole set) and labels, and this rank's validation images and labels
    (numpy)."""
    val = d.shard(len(data.val_labels))
    images = torch.from_numpy(np.array(data.train_images)).to(device)
    labels = torch.from_numpy(data.train_labels).to(device)  # (N,)
    return (images, labels), (data.val_images[val], data.val_labels[val])


def _build(
    p: Params, d: Dist, device: torch.device, data: Processed
) -> tuple[Engine, RunState, list[str]]:
    """The model (initialised, DDP-wrapped, compiled as params say), its optimizer, schedule,
    scaler, EMA and batch generator; the notes on how the speed settings resolved."""
    t = p.train
    raw = pretrained.initialise(build_model(p, data), p)  # train.init: scratch|pretrained|PATH
    speed, notes = resolve_speed(
        device, t.precision, t.memory_format, t.compile, t.cudnn_benchmark, has_conv(raw)
    )
    raw = prepare(raw, speed)
    net = distributed.wrap(raw, d, device, t.sync_batchnorm)
    raw = net.module if d.world > 1 else raw  # SyncBatchNorm conversion made a new module
    if speed.compile:
        net = torch.compile(net)
    optimizer = make_optimizer(raw, t, fused=True if device.type == "cuda" else None)
    per_rank = max(1, t.batch_size // d.world)  # train.batch_size is the global batch
    # Whole batches only: an epoch never ends on a smaller batch (of 1, say).
    steps = max(1, len(data.train_labels) // d.world // per_rank)
    if min(per_rank, len(data.train_labels) // d.world) < 2 and any(
        isinstance(m, _BATCH_NORMS) for m in raw.modules()
    ):
        # torch stops mid-epoch with "Expected more than 1 value per channel" (or learns from
        # one-image statistics): say so before the run starts.
        raise TrainingError(
            f"train.batch_size={t.batch_size}: {p.model} has batch norm, which needs at least 2"
            f" images per training batch{' on each device' if d.world > 1 else ''}; set"
            f" train.batch_size to {2 * d.world} or more"
        )
    ema = None
    if t.ema_decay:
        ema = AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
    s = RunState(
        raw, optimizer, Schedule(optimizer, t, steps),
        torch.amp.GradScaler(device.type, enabled=speed.dtype == torch.float16), ema,
        torch.Generator(device=device).manual_seed(p.seed), world=d.world,  # same on all ranks
    )  # fmt: skip
    loss = make_loss(t.loss, t.label_smoothing)
    e = Engine(net, raw, optimizer, s.schedule, loss, s.scaler, ema, speed, d, s.generator)
    return e, s, notes


def _banner(p: Params, e: Engine, notes: list[str], n: int, resume_at: int | None) -> str:
    speed, world = e.speed, e.dist.world
    return (
        f"train: {p.model} ({sum(q.numel() for q in e.raw.parameters()):,} parameters) on"
        f" {p.dataset}: {n} images, {p.train.epochs} epochs, device {speed.device}"
        f"{f' x {world} processes' if world > 1 else ''}; {speed.precision},"
        f" {'channels_last' if speed.channels_last else 'contiguous'}"
        f"{', compiled' if speed.compile else ''} ({'; '.join(notes)})"
        + (f"; resuming at epoch {resume_at}" if resume_at is not None else "")
    )


def _log_start(p: Params, e: Engine, data: Processed, resumed_from: int | None) -> None:
    """The run's params, data and the device and precision it trains with; the epoch it
    resumes after, or (fresh) the images preprocess skipped, if any."""
    with tracking.shielded():
        device = str(e.speed.device) + (f" x {e.dist.world}" if e.dist.world > 1 else "")
        mlflow.set_tags({"device": device, "precision": e.speed.precision})
        if resumed_from is not None:  # params and data were logged before the interruption
            mlflow.set_tag("resumed_from_epoch", str(resumed_from))
            return
        mlflow.log_params(p.tracked())
        _log_data(p, data)
        if data.info.get("skipped_images"):  # undecodable files (preprocess.skip_bad_images)
            mlflow.log_metric("data_skipped_images", data.info["skipped_images"])


def _progress(epoch: int, epochs: int, row: dict[str, float], patience: int, since: int) -> str:
    """The epoch's line (and the early stop's, when patience ran out)."""
    line = (
        f"epoch {epoch:3d}/{epochs}  loss {row['train_loss']:.4f}"
        f"  train {row['train_top1']:.2%}  val loss {row['val_loss']:.4f}"
        f"  val top-1 {row['val_top1']:.2%}  top-5 {row['val_top5']:.2%}"
        f"  lr {row['lr']:.2e}  {row['images_per_second']:.0f} img/s"
    )
    if patience and since >= patience:
        line += f"\ntrain: early stop, no val top-1 gain for {patience} epochs"
    return line


def _inference(p: Params, data: Processed, speed: Speed, s: RunState) -> checkpoint.Inference:
    """model.pt's content now: the network, the data it learned from, its result weights."""
    return checkpoint.Inference(
        net=p.model, net_options=p.net_options, num_classes=len(data.classes),
        image_size=p.train.crop_size, stored_size=data.image_size, classes=data.classes,
        precision=speed.precision,
        memory_format="channels_last" if speed.channels_last else "contiguous",
        model=s.result.state_dict(), params=p.to_dict(), metrics=s.metrics, epoch=s.epoch,
        mlflow_run_id=s.mlflow_run_id, data=data.info,
    )  # fmt: skip


def _finish(p: Params, data: Processed, speed: Speed, s: RunState) -> None:
    """The stage's outputs, written once: model.pt, history.csv and params.json, then last.pt marked
    complete (a kill in between resumes straight to here); the MLflow artifacts and model."""
    s.complete = True
    model = _inference(p, data, speed, s).to_dict()
    checkpoint.save(paths.CHECKPOINT, model)
    _write_history(s.history)
    write_json(paths.TRAIN_PARAMS, {k: getattr(p.train, k) for k in MODEL_TUNED})
    checkpoint.save(paths.LAST, model | s.state_dict())
    with tracking.shielded():
        mlflow.log_artifact(str(paths.HISTORY))
        mlflow.log_artifact(str(paths.PROCESSED / "mean.png"))
        _log_model(s.result, p, data.classes)


def _log_histograms(model: nn.Module, x: torch.Tensor, speed: Speed, epoch: int) -> None:
    """Per-layer weight/activation statistics as MLflow metrics and a PNG (rank 0)."""
    metrics, samples = histograms.layer_statistics(model, speed.inputs(x))
    fig = histograms.plot(samples, f"activations after epoch {epoch}")
    with tracking.shielded():
        mlflow.log_metrics(metrics, step=epoch)
        mlflow.log_figure(fig, f"histograms/epoch_{epoch:03d}.png")
