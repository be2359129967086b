"""Experiment logging (detrkit.loggers) on short real training runs: what TensorBoard's own reader
finds in the event files equals results.csv, per epoch and per step, across a resume; MLflow (local
file store) and W&B (offline) get the same numbers, the configuration and the best pictures."""
import csv
import json
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detrkit import loggers
from detrkit.cli import build_parser, main
from detrkit.config import TrainConfig, route

TRAIN = ["--model", "detr_r18_tiny", "--image-size", "64", "--batch-size", "4", "--workers", "0"]
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@pytest.fixture(scope="module")
def shapes(synthetic):
    return synthetic(8, 4)  # two steps an epoch


def _train(shapes, run: Path, *extra) -> None:
    data = ["--train-json", str(shapes["train_json"]), "--train-images", str(shapes["train_images"]),
            "--val-json", str(shapes["val_json"]), "--val-images", str(shapes["val_images"])]
    assert main(["train", *data, *TRAIN, "--epochs", "1", "--out", str(run), *extra]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0  # the same logs continue


def _results(run: Path) -> list[dict]:
    with open(run / "results.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _check_against_results(rows: list[dict], series: dict[str, list[tuple[int, float]]]) -> None:
    """``series`` (tag -> [(step, value)], as a logger kept them) against results.csv."""
    for row in rows:
        for k, v in row.items():
            if k != "steps":  # the x of the epoch's values
                tag = ("val/" if k in METRICS else "epoch/") + k
                assert (int(row["steps"]), pytest.approx(v, rel=1e-6, abs=1e-7)) in series[tag], (tag, series[tag])
    assert [step for step, _ in series["train/loss"]] == list(range(1, int(rows[-1]["steps"]) + 1))
    first = 0
    for row in rows:  # each epoch's rows are the means of its steps' values
        last = int(row["steps"])
        for k in (k for k in row if k.startswith("train_")):
            steps = dict(series[f"train/{k.removeprefix('train_')}"])
            mean = sum(steps[s] for s in range(first + 1, last + 1)) / (last - first)
            assert mean == pytest.approx(row[k], abs=1e-5, rel=1e-6), (k, row["epoch"])
        assert dict(series["train/lr"])[last] == pytest.approx(row["lr"], rel=1e-6)  # the epoch's last step
        first = last


def test_tensorboard_event_files_equal_results_csv_across_a_resume(shapes, tmp_path):
    run = tmp_path / "run"
    data = ["--train-json", str(shapes["train_json"]), "--train-images", str(shapes["train_images"]),
            "--val-json", str(shapes["val_json"]), "--val-images", str(shapes["val_images"])]
    assert main(["train", *data, *TRAIN, "--epochs", "1", "--out", str(run), "--log", "tensorboard"]) == 0
    # A process that died after its checkpoint had logged step 3 already; the resume trains it again.
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(run)) as stale:
        stale.add_scalar("train/loss", 999.0, 3)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    rows = _results(run)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["steps"] == 4
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    series = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert 999.0 not in dict(series["train/loss"]).values()  # purged on resume
    _check_against_results(rows, series)
    assert {"train/loss_ce", "train/loss_bbox", "train/loss_giou"} <= set(series)
    assert not any(tag.startswith("train/") and tag[-1].isdigit() for tag in series)  # the auxiliary layers' terms stay out, as in results.csv
    # The configuration (at the start and at the resume) is config.yaml's, the pictures of the best checkpoint at the end.
    texts = events.Tensors("config/text_summary")
    assert [t.step for t in texts] == [0, 2]
    logged = yaml.safe_load("\n".join(line[4:] for line in texts[-1].tensor_proto.string_val[0].decode().splitlines()))
    assert logged == yaml.safe_load((run / "config.yaml").read_text()) and logged["train"]["log"] == ["tensorboard"]
    pictures = sorted(p.stem for p in (run / "best" / "predictions").glob("*.png"))
    assert len(pictures) == 4 and events.Tags()["images"] == [f"best/predictions/{p}" for p in pictures]


def _wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-ID.wandb``): a 7-byte header (":W&B", magic, version),
    then LevelDB log blocks of 32 KiB whose chunks (crc32, length, type) carry protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _wandb_series(run: Path) -> tuple[dict, dict]:
    """``(tag -> [(step, value)], config)`` from every offline W&B session of a run folder."""
    series, config = {}, {}
    for log in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_") and key != "best/predictions":
                        series.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
            elif kind in ("run", "config"):  # the run's config at init, later updates
                update = record.run.config.update if kind == "run" else record.config.update
                config.update({i.key: json.loads(i.value_json) for i in update})
    return series, config


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_mlflow_and_wandb_get_the_same_numbers_config_and_pictures(name, shapes, tmp_path, monkeypatch):
    pytest.importorskip(name)  # the log extra (in the dev extra, so CI has it)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    _train(shapes, run, "--log", name)
    rows = _results(run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    if name == "mlflow":
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
        experiment = client.get_experiment_by_name("detrkit")
        (found,) = client.search_runs([experiment.experiment_id])  # the resume continued the one run
        assert found.data.tags[loggers.RUN_ID_TAG] == saved["run"]["id"] and found.info.status == "FINISHED"
        series = {k: [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, k)]
                  for k in found.data.metrics}
        assert found.data.params["train.model"] == "detr_r18_tiny" and found.data.params["model.d_model"] == "64"
        artifacts = Path(client.download_artifacts(found.info.run_id, "", str(tmp_path / "artifacts")))
        assert yaml.safe_load((artifacts / "config.yaml").read_text()) == saved
        assert len(list((artifacts / "best" / "predictions").glob("*.png"))) == 4
    else:
        sessions = sorted(run.glob("wandb/offline-run-*"))
        assert len(sessions) == 2 and all(s.name.endswith(saved["run"]["id"]) for s in sessions)  # one W&B run id
        series, config = _wandb_series(run)
        assert config["model"] == saved["model"] and config["train"]["model"] == "detr_r18_tiny"
        assert len(list(sessions[-1].glob("files/media/images/best/predictions_*.png"))) == 4
    _check_against_results(rows, series)


def test_log_flag_names_and_a_missing_extra(shapes, tmp_path, monkeypatch, capsys):
    args = build_parser().parse_args(["train", "--log", "tensorboard,mlflow", "--log", "wandb", "--log", "mlflow"])
    sections, _ = route({k: v for k, v in vars(args).items() if v is not None})
    assert TrainConfig(**sections["train"]).log == ("tensorboard", "mlflow", "wandb")
    assert TrainConfig(log="none").log == () and TrainConfig(log=["WandB"]).log == ("wandb",)
    with pytest.raises(ValueError, match="unknown logger 'comet'"):
        TrainConfig(log="tensorboard,comet")
    # Without the extra the run stops before reading any data, naming the extra.
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda n: None if n == "mlflow" else real(n))
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--log", "mlflow", "--out", str(tmp_path / "r")]) == 2
    assert "--log mlflow needs the log extra: pip install 'detrkit[log]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
