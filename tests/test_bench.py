"""The benchmark harness's plumbing on its tiny configuration (benchmarks/bench.py --tiny).

Measures nothing and asserts no timing: it checks that both sides load the same weights and
agree, that every section produces its numbers, and that the matcher check passes.
"""
import runpy
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(BENCH), run_name="bench")


def test_tiny_run_produces_every_number(bench, tmp_path):
    results = bench["main"](["--tiny", "--only", "peak,inference,train,matcher,optimizer,dropout", "--malloc", "default",
                             "--json", str(tmp_path / "bench.json")])
    assert (tmp_path / "bench.json").exists()
    inference = results["inference"]
    assert inference["max_abs_diff_vs_peer"] < 1e-3  # the same weights on both sides
    assert set(inference["times"]) == {"peer fp32", "detrkit fp32", "detrkit bf16"}
    # The two sides run the same network: the same counted FLOPs.
    assert inference["flops"]["detrkit fp32"] == pytest.approx(inference["flops"]["peer fp32"], rel=0.02)
    train = results["train"]
    assert set(train["times"]) == {"peer fp32", "detrkit fp32", "detrkit bf16"}
    assert train["flops"]["detrkit fp32"] == pytest.approx(train["flops"]["peer fp32"], rel=0.02)
    assert all(t["median"] > 0 and t["ratio_to_peer"] > 0 for t in train["times"].values())
    assert results["matcher"]["same_assignments"]
    for model in ("benchmark model", "detr_r18_fast"):
        assert set(results["optimizer"][model]["times"]) == {"PyTorch default", "foreach", "detrkit (fused)"}
    assert set(results["conv_peak"]) == set(results["peak"]) == {"fp32", "bf16", "fp16"}
    assert len(results["dropout"]["times"]) == 5


def test_memory_child_reports_a_peak(bench, tmp_path):
    folder = tmp_path / "detr"
    bench["save_peer"]("tiny", folder)
    row = bench["memory_child"]("detrkit fp32", folder, "tiny")
    assert row["peak_mib"] >= row["rss_before_mib"] > 0 and row["step_peak_mib"] >= 0


def test_top_class_agreement_pairs_queries_by_box_not_by_slot(bench):
    import torch

    class Fixed(torch.nn.Module):
        """Returns fixed outputs, slots in the given order (a two-stage model's ranks can swap)."""
        sigmoid_class = True

        def __init__(self, order, flip=()):
            super().__init__()
            logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0], [-4.0, -4.0]])  # classes 0, 1, nothing
            logits[list(flip)] = logits[list(flip)].flip(-1)
            boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3]])
            self.out = {"pred_logits": logits[order][None], "pred_boxes": boxes[order][None]}

        def forward(self, batch):
            return self.out

    fp32 = Fixed([0, 1, 2])
    assert bench["top_class_agreement"](fp32, Fixed([1, 0, 2]), [None]) == (2, 2)  # swapped slots, same objects
    assert bench["top_class_agreement"](fp32, Fixed([0, 1, 2], flip=[1]), [None]) == (1, 2)  # one class changed


def test_rtdetr_section_on_its_tiny_setting(tmp_path, monkeypatch):
    """The RT-DETR section (benchmarks/bench_rtdetr.py, beside bench.py) on a quarter-width model at
    64 x 64: the same weights on both sides, every case timed once, ratios reported."""
    monkeypatch.syspath_prepend(str(BENCH.parent))  # as when bench.py runs as a script
    bench = runpy.run_path(str(BENCH), run_name="bench")
    results = bench["main"](["--tiny", "--only", "rtdetr", "--malloc", "default"])["rtdetr"]
    assert results["arch"] == "tiny" and results["inference"]["max_abs_diff_vs_peer"] < 1e-3
    assert set(results["inference"]["times"]) == {"peer fp32", "detrkit fp32", "detrkit bf16"}
    assert set(results["train"]["times"]) == {"peer fp32", "detrkit fp32"}
    assert all(t["median"] > 0 and t["ratio_to_peer"] > 0 for t in results["train"]["times"].values())
    # The two sides run the same network (detrkit boxes only the selected cells: a little less).
    assert 0.9 < results["train"]["flops"]["detrkit fp32"] / results["train"]["flops"]["peer fp32"] <= 1.0


def test_train_speed_rows_for_two_presets():
    """benchmarks/train_speed.py: each model trains real optimiser steps of the fast recipe (its
    parameters change), one row per model, the first the peer of the ratios."""
    speed = runpy.run_path(str(BENCH.parent / "train_speed.py"), run_name="train_speed")
    trainer, cfg = speed["trainer_for"]("rtdetr_tiny", "fp32", {"batch_size": 2})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.forward_backward(speed["random_batch"](2, 64))
    trainer.optimizer_step()
    assert cfg.arch == "rtdetr" and any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    rows = speed["measure"](["rtdetr_tiny", "detr_r18_tiny"], 64, 2, 1, "fp32")
    assert [r["model"] for r in rows] == ["rtdetr_tiny", "detr_r18_tiny"] and rows[0]["vs_first"] == 1.0
    assert all(r["img_s"] > 0 and r["gflops"] > 0 and len(r["runs_ms"]) == 1 for r in rows)
