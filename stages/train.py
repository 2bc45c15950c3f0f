"""Stage 3, train: one model on one dataset, data and augmentation on the training device.

Writes out/train/model.pt (what inference needs) once, when training finished, and
out/train/history.csv (one row per epoch, for `dvc plots`) after every epoch, so `dvc plots
show` draws the curves while training runs; logs everything to one MLflow run, epoch by epoch,
and the model at the end (stages.engine.serving: image files in, class names out). Two more
checkpoints stay outside DVC's outputs: last.pt (every epoch: the model plus the run's state,
`RunState`, with the history so far; a killed run resumes from it) and best.pt (the same, at
the epoch with the best validation top-1). history.csv is rewritten whole (atomically) from
the history last.pt holds, after last.pt: it never shows an epoch last.pt lacks, so a resumed
run only adds rows, and the finished file is the same whichever way the run got there.
stages.core.checkpoint defines what each file holds. Under torchrun every rank trains on its
shard of the data with DistributedDataParallel; rank 0 alone logs and writes files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os

import mlflow
import numpy as np
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stages.core import checkpoint, paths, tracking
from stages.core.errors import Interrupted
from stages.core.files import atomic_path, only_one, write_json
from stages.core.runlog import RunLog, run_log
from stages.data.augment import center_crop
from stages.data.processed import Processed, load_processed
from stages.data.sources import SOURCES
from stages.data.stream import Resident, Streamed
from stages.engine import distributed, pretrained, provenance, serving
from stages.engine.device import (
    Speed,
    has_conv,
    memory_budget,
    prepare,
    resolve_device,
    resolve_speed,
)
from stages.engine.distributed import Dist
from stages.engine.loop import TrainingError, run_epoch, steps_per_epoch
from stages.engine.losses import make_loss
from stages.engine.model import build_model
from stages.engine.optim import make_optimizer
from stages.engine.schedules import Schedule
from stages.engine.state import RunState
from stages.explain import histograms
from stages.params import Params, TrainParams, flatten

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _write_history(rows: list[dict]) -> None:
    """history.csv: one row per finished epoch, replaced whole so a reader (`dvc plots show`
    during training) never sees half a file."""
    if not rows:
        return
    with atomic_path(paths.HISTORY) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _log_data(p: Params, data: Processed, log: RunLog) -> None:
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
    for split, context in (("train", "training"), ("val", "validation")):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        found = data.info["digests"][split]  # preprocess computed it, over the whole split
        dataset = mlflow.data.from_numpy(
            images, source=source, targets=labels, name=p.dataset, digest=found
        )
        log.input(dataset, context)


def _resume_state(params: Params, dist: Dist, data_info: dict) -> dict | None:
    """last.pt when it is an unfinished run with exactly these params and data, else None."""
    if not params.train.resume or not paths.LAST.exists():
        return None
    try:
        saved = checkpoint.load(
            paths.LAST, require=checkpoint.INFERENCE_KEYS + checkpoint.RESUME_KEYS
        )
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(
            f"{err}; delete it, or set train.resume=false to overwrite it"
        ) from None
    old, new = flatten(saved["params"]), flatten(params.to_dict())
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    reason = (
        f"params differ ({', '.join(changed[:3])})" if changed
        else "it is a finished run" if saved["complete"]
        else "the processed data differ" if saved["data"] != data_info
        else f"it was trained on {saved['world']} processes" if saved["world"] != dist.world
        else None
    )  # fmt: skip
    if reason:
        if dist.main:
            print(f"train: not resuming from {paths.LAST}: {reason}; starting fresh")
        return None
    return saved


def _mlflow_run(
    dist: Dist, run_id: str | None, params: Params
) -> contextlib.AbstractContextManager[RunLog | None]:
    """Rank 0's MLflow run (the interrupted one when resuming); other ranks log nothing."""
    if not dist.main:
        return contextlib.nullcontext()
    return run_log(
        serving.package, run_id, run_name=tracking.run_name(params.dataset, params.model),
        tags=tracking.run_tags(params.dataset, params.model, source="stages/train.py"),
        open_run=paths.OPEN_RUN,
    )  # fmt: skip


def train(params: Params) -> dict[str, float]:
    """Train `params.model` on the preprocessed data; returns the last epoch's metrics."""
    dist, device = distributed.setup(resolve_device(params.train.device))
    try:
        with contextlib.ExitStack() as held:  # out/train, once _train takes it
            return _train(params, dist, device, held)
    except torch.OutOfMemoryError:
        raise TrainingError(
            f"out of memory on {device} with train.batch_size {params.train.batch_size}"
            f" ({max(1, params.train.batch_size // dist.world)} per device); lower"
            " train.batch_size (or evaluate.batch_size for validation)"
        ) from None
    finally:
        distributed.cleanup(dist)


def _train(
    params: Params, dist: Dist, device: torch.device, held: contextlib.ExitStack
) -> dict[str, float]:
    """The run: set up (or resume), one epoch at a time, then the results (rank 0 writes).
    `held` keeps out/train for this training until train() returns."""
    settings = params.train
    torch.manual_seed(params.seed)
    data = load_processed(params.preprocess_inputs())  # checked, not yet read
    if dist.main:
        tracking.setup()  # the store answers, or one line before the data are read
        # One training per out/train: two would write one model.pt and end their MLflow runs
        # with each other's model. Rank 0 holds it (other nodes may not share out/).
        held.enter_context(only_one(paths.TRAIN, "a training"))
    train_set, val_set = _training_data(params, data, dist, device)
    run, notes = _build(params, dist, device, data)
    # Rank 0 decides, from its last.pt, for every rank (other nodes may not share out/).
    resumed = distributed.from_main(
        dist, _resume_state(params, dist, data.info) if dist.main else None
    )
    if resumed is not None:
        run.load_state_dict(resumed)
        if dist.main:  # the epochs so far at once (DVC deleted its outputs before the stage)
            _write_history(run.history)
    resumed_from = run.epoch if resumed is not None else None
    if dist.main:
        print(_banner(params, run, notes, len(data.train_labels), resumed_from))
    sample = center_crop(torch.from_numpy(np.array(data.val_images[:256])), settings.crop_size)
    val_batch, every = params.evaluate.batch_size, settings.histogram_every
    with _mlflow_run(dist, run.mlflow_run_id, params) as log:
        if dist.main:
            run.mlflow_run_id = log.run_id
            _log_start(params, run, data, log, resumed_from)
            tracking.system_metrics(device)  # starts the CPU-use interval of the first epoch
        saved = run.epoch  # the epoch last.pt holds
        try:
            for epoch in range(run.epoch + 1, settings.epochs + 1):
                if settings.patience and run.since_best >= settings.patience:
                    break  # stopped early (in this process, or before the kill it resumes from)
                if dist.main and every and (epoch - 1) % every == 0:
                    _log_histograms(log, run.model, sample.to(device), run.speed, epoch - 1)
                pretrained.freeze_body(run.model, frozen=epoch <= settings.freeze_epochs)
                row = run_epoch(run, train_set, val_set, settings, val_batch, epoch)
                improved = run.end_epoch(epoch, row)
                if dist.main:
                    log.batch("the metrics", epoch, row | tracking.system_metrics(device))
                    state = _inference(params, data, run).to_dict() | run.state_dict()
                    checkpoint.save(paths.LAST, state)
                    saved = epoch
                    if improved:
                        checkpoint.save(paths.BEST, state)
                    _write_history(run.history)  # after last.pt: never ahead of it
                    print(_progress(epoch, settings, row, run.since_best), flush=True)
        except Interrupted as err:  # say how far training got and how to go on
            raise Interrupted(err.signum, _stopped(run.epoch, saved, settings.epochs)) from None
        if dist.main:
            _finish(params, data, run, log)
    return run.metrics


def _stopped(reached: int, saved: int, epochs: int) -> str:
    """Where an interrupted training stands and how to go on."""
    kept = (
        f"{paths.LAST} holds epoch {saved}: run the same command again to resume there"
        if saved else "no epoch was saved yet, so running again starts over"
    )  # fmt: skip
    return f"training stopped in epoch {reached + 1} of {epochs}; {kept}"


def _training_data(
    params: Params, data: Processed, dist: Dist, device: torch.device
) -> tuple[Resident | Streamed, tuple[np.ndarray, np.ndarray]]:
    """The training set, on the device when it fits `train.memory_budget`, else streamed from
    its file (every rank draws its part of each batch from the whole set); this rank's
    validation images and labels (numpy)."""
    val = dist.shard(len(data.val_labels))
    images, labels = data.train_images, data.train_labels
    budget = memory_budget(params.train.memory_budget, device)
    if images.nbytes <= budget:
        train = Resident(images, labels, device)
    else:
        train = Streamed(images, labels, device)
        if dist.main:
            print(
                f"train: streaming the training set from {images.filename}: its"
                f" {images.nbytes / 2**30:.2f} GiB exceed train.memory_budget"
                f" ({budget / 2**30:.2f} GiB on {device})"
            )
    return train, (data.val_images[val], data.val_labels[val])


def _build(
    params: Params, dist: Dist, device: torch.device, data: Processed
) -> tuple[RunState, list[str]]:
    """The model (initialised, DDP-wrapped, compiled as params say), its optimizer, schedule,
    scaler, EMA, batch generator and loss; the notes on how the speed settings resolved."""
    settings = params.train
    model = pretrained.initialise(build_model(params, data), params)  # scratch|pretrained|PATH
    per_rank = max(1, settings.batch_size // dist.world)  # train.batch_size is the global batch
    steps = steps_per_epoch(len(data.train_labels), settings.batch_size, dist.world)
    speed, notes = resolve_speed(
        device, settings.precision, settings.memory_format, settings.compile,
        settings.cudnn_benchmark, has_conv(model),
    )  # fmt: skip
    # Every rank trains as rank 0 decided (nodes of a multi-node run may differ in hardware).
    dtype, channels_last = distributed.from_main(dist, (speed.dtype, speed.channels_last))
    speed = dataclasses.replace(speed, dtype=dtype, channels_last=channels_last)
    model = prepare(model, speed)
    net = distributed.wrap(model, dist, device, settings.sync_batchnorm)
    model = net.module if dist.world > 1 else model  # SyncBatchNorm conversion made a new module
    if speed.compile:
        net = torch.compile(net)
    optimizer = make_optimizer(model, settings)
    if min(per_rank, len(data.train_labels) // dist.world) < 2 and any(
        isinstance(m, _BATCH_NORMS) for m in model.modules()
    ):
        # torch stops mid-epoch with "Expected more than 1 value per channel" (or learns from
        # one-image statistics): say so before the run starts.
        raise TrainingError(
            f"train.batch_size={settings.batch_size}: {params.model} has batch norm, which"
            " needs at least 2 images per training batch"
            f"{' on each device' if dist.world > 1 else ''}; set train.batch_size to"
            f" {2 * dist.world} or more"
        )
    ema = None
    if settings.ema_decay:
        average = get_ema_multi_avg_fn(settings.ema_decay)
        ema = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
    run = RunState(
        net, model, optimizer, Schedule(optimizer, settings, steps),
        torch.amp.GradScaler(device.type, enabled=speed.dtype == torch.float16), ema,
        torch.Generator(device=device).manual_seed(params.seed),  # the same on every rank
        make_loss(settings.loss, settings.label_smoothing), speed, dist,
    )  # fmt: skip
    return run, notes


def _banner(params: Params, run: RunState, notes: list[str], n: int, resume_at: int | None) -> str:
    speed, world = run.speed, run.dist.world
    return (
        f"train: {params.model} ({sum(q.numel() for q in run.model.parameters()):,} parameters)"
        f" on {params.dataset}: {n} images, {params.train.epochs} epochs, device {speed.device}"
        f"{f' x {world} processes' if world > 1 else ''}; {speed.precision},"
        f" {speed.memory_format}"
        f"{', compiled' if speed.compile else ''} ({'; '.join(notes)})"
        + (f"; resuming at epoch {resume_at + 1}" if resume_at is not None else "")
    )


def _log_start(
    params: Params, run: RunState, data: Processed, log: RunLog, resumed_from: int | None
) -> None:
    """The run's params, data and the device and precision it trains with; the epoch it
    resumes after, or (fresh) the images preprocess skipped, if any."""
    world = run.dist.world
    device = str(run.speed.device) + (f" x {world}" if world > 1 else "")
    ran_with = provenance.describe(run.speed, world)
    tags = {k: str(v) for k, v in ran_with.items()} | {"device": device}
    if resumed_from is not None:  # params and data were logged before the interruption
        log.batch("the tags", tags=tags | {"resumed_from_epoch": resumed_from})
        # A kill (SIGKILL, a node lost) takes the metrics still queued with it: last.pt's
        # history has every finished epoch, so the store gets the ones it lacks.
        logged = log.steps("val_top1")
        for row in run.history if logged is not None else []:
            if int(row["epoch"]) not in logged:
                metrics = {k: v for k, v in row.items() if k != "epoch"}
                log.batch("the metrics", int(row["epoch"]), metrics)
        return
    skipped = data.info.get("skipped_images")  # undecodable files (preprocess.skip_bad_images)
    metrics = {"data_skipped_images": skipped} if skipped else {}
    log.batch("the params and tags", params=params.tracked(), tags=tags, metrics=metrics)
    _log_data(params, data, log)


def _progress(epoch: int, settings: TrainParams, row: dict[str, float], since: int) -> str:
    """The epoch's line (and the early stop's, when patience ran out)."""
    line = (
        f"epoch {epoch:3d}/{settings.epochs}  loss {row['train_loss']:.4f}"
        f"  train {row['train_top1']:.2%}  val loss {row['val_loss']:.4f}"
        f"  val top-1 {row['val_top1']:.2%}  top-5 {row['val_top5']:.2%}"
        f"  lr {row['lr']:.2e}  {row['images_per_second']:.0f} img/s"
    )
    if settings.patience and since >= settings.patience:
        line += f"\ntrain: early stop, no val top-1 gain for {settings.patience} epochs"
    return line


def _inference(params: Params, data: Processed, run: RunState) -> checkpoint.Inference:
    """model.pt's content now: the network, the data it learned from, its result weights."""
    speed = run.speed
    return checkpoint.Inference(
        net=params.model, net_options=params.net, num_classes=len(data.classes),
        image_size=params.train.crop_size, stored_size=data.image_size, classes=data.classes,
        precision=speed.precision,
        memory_format=speed.memory_format,
        model=run.result.state_dict(), params=params.to_dict(), metrics=run.metrics,
        epoch=run.epoch, mlflow_run_id=run.mlflow_run_id, data=data.info,
    )  # fmt: skip


def _finish(params: Params, data: Processed, run: RunState, log: RunLog) -> None:
    """The stage's outputs: model.pt, history.csv (as after the last epoch), run.json (what
    it ran with, the sum of its epoch times, the machine's load), then last.pt marked complete
    (a kill in between resumes straight to here); then the MLflow
    artifacts and model are queued: model.pt's network as the run's MLflow model
    `<dataset>-<model>` (registered as `convnet-<dataset>-<model>` with train.register_model)."""
    run.complete = True
    model = _inference(params, data, run).to_dict()
    checkpoint.save(paths.CHECKPOINT, model)
    _write_history(run.history)
    seconds = sum(float(row["epoch_seconds"]) for row in run.history)
    # The load average says whether the time was measured on a machine busy with other work.
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    write_json(
        paths.RUN_INFO,
        provenance.describe(run.speed, run.dist.world)
        | {"epochs": run.epoch, "train_seconds": round(seconds, 1), "load_average": load},
    )
    checkpoint.save(paths.LAST, model | run.state_dict())
    log.artifact(paths.HISTORY)
    log.artifact(paths.RUN_INFO)
    mean_png = paths.PROCESSED / "mean.png"
    if mean_png.is_file():  # a picture only: processed data made without it still train
        log.artifact(mean_png)
    log.model(paths.CHECKPOINT, params.dataset, params.model, params.train.register_model)


def _log_histograms(
    log: RunLog, model: nn.Module, x: torch.Tensor, speed: Speed, epoch: int
) -> None:
    """Per-layer weight/activation statistics as MLflow metrics and a PNG (rank 0)."""
    metrics, samples = histograms.layer_statistics(model, speed.inputs(x))
    fig = histograms.plot(samples, f"activations after epoch {epoch}")
    log.batch("the histograms", epoch, metrics)
    log.figure(fig, f"histograms/epoch_{epoch:03d}.png", epoch)
