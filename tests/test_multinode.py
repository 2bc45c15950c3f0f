"""More than one machine: two torchrun "nodes" (c10d rendezvous, gloo, on this machine) train one
model together, log one MLflow run and end with the weights one process reaches with the same
global batch and seed, also when both nodes die and are started again (resume from last.pt);
the sampling that makes it so, checked in-process."""

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from helpers.fabricate import SLOW_EPOCH, setup
from helpers.processes import METRICS, env, free_port, history

from stages.core import checkpoint
from stages.data.augment import augment
from stages.engine.distributed import Dist

# Every random draw of the loop (crop, flip, vertical flip, brightness, cutout) in play.
# fp32: bf16 (what `precision: auto` takes on a CPU with AMX) rounds each rank's half batch
# otherwise than the whole batch, by far more than the summing order (0.03 in a bias, measured).
TRAIN = {"epochs": 2, "optimizer": "sgd", "pad": 2, "brightness": 0.3, "cutout": 3, "vflip": True,
         "precision": "fp32"}  # fmt: skip


def test_ranks_slices_of_a_global_batch_augment_like_the_whole_batch():
    images = torch.randint(0, 256, (40, 16, 16, 3), dtype=torch.uint8)
    idx = torch.randperm(40)[:12]  # (12,) a global batch
    opts = {"size": 12, "pad": 2, "flip": True, "vflip": True, "brightness": 0.3, "hue": 0.1,
            "cutout_size": 3}  # fmt: skip
    for kw in ({}, {"pad": 0}, {"resized_crop_scale": 0.5}):
        whole_g = torch.Generator().manual_seed(5)
        whole = augment(images, generator=whole_g, index=idx, **opts | kw)  # (12, 3, 12, 12)
        for world in (2, 3):
            parts = []
            for rank in range(world):
                g = torch.Generator().manual_seed(5)
                part = Dist(rank, world).part(len(idx))
                x = augment(images, generator=g, index=idx[part], within=(part.start, len(idx)),
                            **opts | kw)  # fmt: skip
                parts.append(x)
                # Every rank drew what one process draws: the next batch's draws agree too.
                assert torch.equal(g.get_state(), whole_g.get_state()), (kw, world)
            assert torch.equal(torch.cat(parts), whole), (kw, world)


def single_process(root: Path) -> None:
    """`python -m stages train` in `root`: the reference the nodes must match."""
    cmd = [sys.executable, "-m", "stages", "train"]
    out = subprocess.run(cmd, cwd=root, env=env(root), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def start_nodes(folders: list[Path], store: Path) -> list[subprocess.Popen]:
    """Two torchrun launches, one per "node", each in its folder, meeting at a c10d rendezvous
    on 127.0.0.1; both log to the MLflow store in `store`."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
           "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "-m", "stages", "train"]  # fmt: skip
    e = env(store) | {"OMP_NUM_THREADS": "1"}
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    return [subprocess.Popen(cmd, cwd=folder, env=e, **out) for folder in folders]


def finish(nodes: list[subprocess.Popen]) -> str:
    """Both nodes' output, once both ended well."""
    said = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(s[-3000:] for s in said)
    return "".join(said)


def one_finished_run(store: Path, epochs: int) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("convnet-pipeline").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
    assert steps == list(range(1, epochs + 1))
    return run


def assert_same_training(root: Path, reference: Path) -> None:
    """The same weights and history as the one-process run: the same steps were taken, up to the
    order in which the gradient all-reduce adds the ranks' shares of each batch."""
    torch.testing.assert_close(
        checkpoint.load(root / "out/train/model.pt")["model"],
        checkpoint.load(reference / "out/train/model.pt")["model"],
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    for a, b in zip(history(root), history(reference), strict=True):
        for key in METRICS:
            assert abs(a[key] - b[key]) < 1e-5, (key, a, b)


@pytest.mark.slow
def test_two_nodes_train_one_model_like_one_process(tmp_path):
    """Each node in its own folder with its own processed data (no shared filesystem): the
    results land on rank 0's node alone."""
    one, nodes = tmp_path / "one", tmp_path / "nodes"
    nodes.mkdir()
    for root in (one, nodes / "a", nodes / "b"):
        setup(root, **TRAIN)
    single_process(one)
    said = finish(start_nodes([nodes / "a", nodes / "b"], store=nodes))
    assert said.count("x 2 processes") == 1  # rank 0 alone prints, on either node
    run = one_finished_run(nodes, epochs=2)
    assert run.data.tags["device"] == "cpu x 2"
    [main] = [root for root in (nodes / "a", nodes / "b") if (root / "out/train").exists()]
    assert_same_training(main, one)


@pytest.mark.slow
def test_nodes_killed_mid_run_resume_from_last_pt_like_one_process(tmp_path):
    """Both nodes die (SIGKILL, agents and workers) after an epoch; the same two commands again
    resume from last.pt on the shared folder and end where one uninterrupted process does."""
    one, shared = tmp_path / "one", tmp_path / "shared"
    for root in (one, shared):
        # 1,200 steps at the usual 0.05 are unstable (the loss rises above chance), and the
        # all-reduce's rounding differences then grow past the tolerance: a stable rate.
        setup(root, n_train=SLOW_EPOCH, **TRAIN | {"epochs": 4, "lr": 0.005})
    single_process(one)
    nodes = start_nodes([shared, shared], store=shared)
    last = shared / "out/train/last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and all(n.poll() is None for n in nodes):
        assert time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.02)
    for node in nodes:  # the whole node: the torchrun agent and its worker
        agent = psutil.Process(node.pid)
        for proc in [*agent.children(recursive=True), agent]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        node.communicate()
    done = checkpoint.load(last)["epoch"]
    assert 1 <= done < 4, "the run finished before it could be killed"

    said = finish(start_nodes([shared, shared], store=shared))
    assert f"resuming at epoch {done + 1}" in said
    one_finished_run(shared, epochs=4)  # the interrupted run, reopened
    assert_same_training(shared, one)
