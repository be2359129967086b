"""--precision auto: the decision on step times (with a fake timer: no timing assertions), a run that
measured equals a run given the chosen precision, the choice recorded for a resume."""
import dataclasses
import itertools

import pytest
import torch
import yaml
from safetensors.torch import load_file

import detrkit.precision as precision
from detrkit.config import TrainConfig
from detrkit.presets import resolve
from detrkit.errors import DataError
from detrkit.rng import rng_state
from detrkit.run import plan, settle_precision
from detrkit.run import train as train_run


class FakeClock:
    """A timer under which the steps of :func:`precision.measure` (fp32, bf16, fp32, ...) take the
    given seconds, one value per step in that order, repeated."""

    def __init__(self, *seconds: float) -> None:
        self.seconds, self.now, self.calls = itertools.cycle(seconds), 0.0, 0

    def __call__(self) -> float:
        if self.calls % 2:  # every second call ends a step
            self.now += next(self.seconds)
        self.calls += 1
        return self.now


def test_measure_alternates_skips_the_warm_up_and_takes_medians(monkeypatch):
    # Warm-up rounds (not counted): bf16 very slow. Timed rounds: fp32 1.0 but for one outlier
    # (9.0); bf16 spread around 0.55. Counting the warm-up or taking means would change the numbers.
    timed = precision.TIMED_STEPS
    fp32 = [1.0] * (timed - 1) + [9.0]
    bf16 = [0.55 + 0.01 * (i - timed // 2) for i in range(timed)]  # median 0.55; with the warm-up's 5.0s, more
    steps = [0.1, 5.0] * precision.WARMUP_STEPS + [t for pair in zip(fp32, bf16) for t in pair]
    monkeypatch.setattr(precision, "clock", FakeClock(*steps))
    order = []
    seconds = precision.measure(order.append, torch.device("cpu"))
    assert order == ["fp32", "bf16"] * (precision.WARMUP_STEPS + precision.TIMED_STEPS)
    assert seconds == pytest.approx({"fp32": 1.0, "bf16": 0.55})
    assert precision.pick(seconds) == "bf16"


def test_bf16_must_be_clearly_faster():
    assert precision.BF16_MARGIN == 0.95
    assert precision.pick({"fp32": 1.0, "bf16": 0.9}) == "bf16"
    assert precision.pick({"fp32": 1.0, "bf16": 0.96}) == "fp32"  # within the noise of a few steps: fp32, exact
    assert precision.pick({"fp32": 1.0, "bf16": 1.9}) == "fp32"
    line = precision.report("fp32", {"fp32": 0.25, "bf16": 0.4})
    assert line == "precision auto: fp32 (a training step took 250 ms in fp32, 400 ms in bf16; median of 5 steps each)"


def test_a_gpu_without_native_bf16_takes_fp32_untimed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)

    def never():
        raise AssertionError("nothing is built or timed")

    assert precision.choose(never, TrainConfig(), [], torch.device("cuda")) == ("fp32", {})
    assert precision.report("fp32", {}) == "precision auto: fp32 (this GPU has no native bf16; not timed)"
    assert precision.untimed_choice(torch.device("cpu")) is None  # a CPU is measured


def test_no_training_images_is_a_clear_error():
    with pytest.raises(DataError, match="no training images"):
        precision.first_steps([], TrainConfig())


@pytest.fixture(scope="module")
def shapes(synthetic):
    return synthetic(4, 2)


def _configs(shapes, out, **train):
    data = {"train_json": str(shapes["train_json"]), "train_images": str(shapes["train_images"]),
            "image_size": 64, "workers": 0, "augment": "flip"}
    return resolve(None, {"train": {"model": "detr_r18_tiny", "epochs": 1, "batch_size": 2, "out": str(out),
                                    "device": "cpu", **train}, "data": data})


def test_a_run_that_measured_equals_a_run_given_its_choice(shapes, tmp_path, monkeypatch, capsys):
    """Dropout on (the random streams matter): measuring leaves no trace on the run."""
    monkeypatch.setattr(precision, "clock", FakeClock(1.0, 0.5))  # bf16 twice as fast
    auto = train_run(*_configs(shapes, tmp_path / "auto", precision="auto"))
    assert "precision auto: bf16 (a training step took 500 ms in bf16, 1000 ms in fp32; median of 5 steps each)" \
        in capsys.readouterr().out
    assert yaml.safe_load((auto / "config.yaml").read_text())["train"]["precision"] == "bf16"
    given = train_run(*_configs(shapes, tmp_path / "bf16", precision="bf16"))
    a, b = load_file(auto / "last" / "model.safetensors"), load_file(given / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a = torch.load(auto / "last" / "train_state.pt", weights_only=True)
    state_b = torch.load(given / "last" / "train_state.pt", weights_only=True)
    assert torch.equal(state_a["rng"][0]["torch"], state_b["rng"][0]["torch"])  # dropout drew the same numbers
    drop = ("seconds",)
    rows = [[{k: v for k, v in zip(lines[0].split(","), line.split(",")) if k not in drop} for line in lines[1:]]
            for lines in ((run / "results.csv").read_text().splitlines() for run in (auto, given))]
    assert rows[0] == rows[1]


def test_measuring_restores_the_random_states_and_a_resume_reads_the_choice(shapes, tmp_path, monkeypatch):
    device = torch.device("cpu")
    torch.manual_seed(3)
    p = plan(*_configs(shapes, tmp_path / "r", precision="auto"), device)
    monkeypatch.setattr(precision, "clock", FakeClock(0.5, 1.0))  # fp32 twice as fast
    before = rng_state(device)
    settled = settle_precision(p, device)
    after = rng_state(device)
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    assert torch.equal(before["numpy"][1], after["numpy"][1])
    assert settled.train == dataclasses.replace(p.train, precision="fp32") and settled.model == p.model
    # A resumed run takes the choice its config.yaml recorded and measures nothing.
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text(yaml.safe_dump(
        {s: dataclasses.asdict(c) for s, c in zip(("model", "loss", "data", "train"),
                                                   (p.model, p.loss, p.data, dataclasses.replace(p.train, precision="bf16")))}))
    monkeypatch.setattr(precision, "clock", lambda: pytest.fail("a resumed run measured"))
    resumed = settle_precision(dataclasses.replace(p, train=dataclasses.replace(p.train, resume=True)), device)
    assert resumed.train.precision == "bf16"
