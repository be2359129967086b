"""Two CPU processes (Gloo) under torchrun against one process, and torchrun's elastic restart.

One torchrun job serves most tests here (starting processes is the slow part): 2 processes x
batch 2 for 2 epochs of one step each, evaluated after each epoch. In its first attempt rank 1
is killed in epoch 2 (tests/ddp_job.py); torchrun restarts both, and they resume from epoch 1's
checkpoint. The reference is one process with batch 4 on the same data. The multi-node form
(two launchers, one process each) runs as a second job.
"""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import detrkit.engine as engine
from detrkit.checkpoint import load_model
from detrkit.cli import main
from detrkit.presets import resolve
from detrkit.data.synthetic import make_synthetic
from detrkit.evaluate import METRIC_KEYS
from detrkit.run import initial_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    shapes = make_synthetic(tmp / "shapes", num_train=4, num_val=4, image_size=64)
    (tmp / "cfg.yaml").write_text("model: {preset: detr_r18_tiny, dropout: 0.0}\n")
    flags = ["--train-json", str(shapes["train_json"]), "--train-images", str(shapes["train_images"]),
             "--val-json", str(shapes["val_json"]), "--val-images", str(shapes["val_images"]),
             "--config", str(tmp / "cfg.yaml"), "--image-size", "64", "--augment", "flip", "--workers", "0",
             "--device", "cpu", "--epochs", "2", "--logger", "tensorboard"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1",
           # Restarted processes must not meet the first attempt's keys in torchrun's shared
           # rendezvous store (pytorch/pytorch#135712; docs/distributed.md).
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
         "--monitor-interval", "0.1", str(ROOT / "tests" / "ddp_job.py"), "train", *flags, "--batch-size", "2",
         "--out", str(tmp / "ddp")],
        env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    # One process, batch 4: epoch 1, then resumed for epoch 2 (resume at an epoch boundary is exact).
    with _one_thread():
        assert main(["train", *flags, "--batch-size", "4", "--epochs", "1", "--out", str(tmp / "one")]) == 0
        one_epoch1 = load_file(tmp / "one" / "last" / "model.safetensors")
        assert main(["train", "--resume", str(tmp / "one"), "--epochs", "2"]) == 0
    return {"ddp": tmp / "ddp", "one": tmp / "one", "one_epoch1": one_epoch1, "log": job.stdout + job.stderr,
            "flags": flags, "env": env,
            "val": {"val_json": str(shapes["val_json"]), "val_images": str(shapes["val_images"]), "workers": 0}}


def test_one_step_on_two_processes_equals_one_process_on_the_same_global_batch(runs):
    ddp = load_file(runs["ddp"] / "epoch1" / "model.safetensors")
    one = runs["one_epoch1"]
    # The step moved the weights away from the (seeded) initial ones ...
    torch.manual_seed(42)
    model_cfg, _, _, train_cfg = resolve(None, {"train": {"model": "detr_r18_tiny"}, "model": {"dropout": 0.0}})
    init = initial_model(model_cfg, train_cfg, [{"id": i, "name": str(i)} for i in (1, 2, 3, 5)]).state_dict()
    assert sum(not torch.equal(one[k], init[k]) for k in one) > 20
    # ... in the same way on two processes as on one.
    for k in one:
        assert torch.allclose(ddp[k], one[k], rtol=0, atol=1e-6), k
    # The logged losses are those of the whole global batch on both (num_boxes and the
    # cross-entropy weights are all-reduced).
    row_ddp = _rows(runs["ddp"])[0]
    row_one = _rows(runs["one"])[0]
    for key in ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou"):
        assert float(row_ddp[key]) == pytest.approx(float(row_one[key]), abs=2e-5), key


def test_evaluation_gathers_every_rank_and_equals_one_process(runs):
    folder = runs["ddp"] / "epoch1"
    reported = json.loads((folder / "metrics.json").read_text())
    # The same weights evaluated by one process, in batches of 2 as each rank made them.
    with _one_thread():
        metrics, detections = engine.evaluate_model(load_model(folder), runs["val"], batch_size=2, device="cpu")
    assert {k: metrics[k] for k in METRIC_KEYS} == {k: reported[k] for k in METRIC_KEYS}
    assert detections == json.loads((folder / "detections.json").read_text())
    assert len({d["image_id"] for d in detections}) == 4  # both ranks' images
    # And the single-process run, whose weights are within 1e-6, reports the same numbers.
    one = json.loads(_first_metrics(runs["one"]))
    assert {k: one[k] for k in METRIC_KEYS} == pytest.approx({k: reported[k] for k in METRIC_KEYS},
                                                                     abs=1e-6)


def test_a_killed_rank_is_restarted_and_the_run_resumes_from_its_last_checkpoint(runs):
    log = runs["log"]
    assert "resuming" in log and "at epoch 2" in log  # the restarted processes resumed epoch 2
    rows = _rows(runs["ddp"])
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[-1]["steps"] == "2"
    # TensorBoard: rank 0 alone wrote (one event file per attempt), and each step is logged once.
    assert len(list(runs["ddp"].glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(runs["ddp"]))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in events.Scalars("epoch/train_loss")] == pytest.approx([float(r["train_loss"]) for r in rows])
    # The finished run matches the uninterrupted single process after both steps.
    ddp = load_file(runs["ddp"] / "last" / "model.safetensors")
    one = load_file(runs["one"] / "last" / "model.safetensors")
    for k in one:
        assert torch.allclose(ddp[k], one[k], rtol=0, atol=1e-5), k


def test_a_two_process_run_resumes_in_one_process(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["ddp"], run)  # the fixture's run stays as the other tests read it
    with _one_thread():
        assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert "the checkpoint was written by 2 processes, this run has 1" in capsys.readouterr().out
    rows = _rows(run)
    # Epoch 3 on one process: the global batch is now 2, so 2 steps over the 4 images.
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[-1]["steps"] == "4"
    before = load_file(runs["ddp"] / "last" / "model.safetensors")
    after = load_file(run / "last" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_the_multi_node_form_trains_as_one_process_and_only_rank_0_writes(runs, tmp_path):
    """``torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT``, one launcher per
    machine (here two folders on one machine, one process each), is the same training."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for name in ("node0", "node1"):
        (tmp_path / name).mkdir()
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test",
             "-m", "detrkit", "train", *runs["flags"], "--batch-size", "2", "--epochs", "1", "--out", "run"],
            cwd=tmp_path / name, env=runs["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    # The run folder is on the machine of rank 0 alone (which machine that is, the rendezvous decides).
    written = [tmp_path / name / "run" for name in ("node0", "node1") if (tmp_path / name / "run").exists()]
    assert len(written) == 1 and (written[0] / "results.csv").exists()
    assert len(list(written[0].glob("events.out.tfevents.*"))) == 1  # --log tensorboard: rank 0's log only
    ddp = load_file(written[0] / "last" / "model.safetensors")
    for k, v in runs["one_epoch1"].items():
        assert torch.allclose(ddp[k], v, rtol=0, atol=1e-6), k


def test_precision_auto_is_decided_once_for_all_processes_and_leaves_the_run_untouched(runs, tmp_path):
    """Each rank times the steps differently (tests/ddp_precision_job.py); all take the averaged
    decision, rank 0 says it once, and the run is the single-process fp32 run of the same batch."""
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "ddp_precision_job.py"), "train", *runs["flags"], "--batch-size", "2", "--epochs", "1",
         "--precision", "auto", "--out", str(tmp_path / "auto")],
        env=runs["env"], capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    lines = [line for line in (job.stdout + job.stderr).splitlines() if line.startswith("precision auto")]
    assert lines == ["precision auto: fp32 (a training step took 1000 ms in fp32, 1250 ms in bf16; median of 5 steps each)"]
    assert "precision: fp32" in (tmp_path / "auto" / "config.yaml").read_text()
    ddp = load_file(tmp_path / "auto" / "last" / "model.safetensors")
    for k, v in runs["one_epoch1"].items():
        assert torch.allclose(ddp[k], v, rtol=0, atol=1e-6), k


def test_a_run_on_channels_last_activations_prints_no_ddp_stride_warning(runs):
    # 1x1 convolutions' weight gradients differ from the weights in size-1 strides only (run.py).
    assert "Grad strides do not match" not in runs["log"]


@contextlib.contextmanager
def _one_thread():
    """As the torchrun processes (OMP_NUM_THREADS=1): the same order of float sums, the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _rows(run):
    lines = (run / "results.csv").read_text().splitlines()
    return [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]


def _first_metrics(run) -> str:
    row = _rows(run)[0]
    return json.dumps({k: float(row[k]) for k in METRIC_KEYS})
