"""Checkpoints: detrkit round trip, official-format import, safety against code in pickles,
a save killed at any moment."""
import argparse
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from conftest import THREE_CLASSES as CLASSES
from conftest import tiny_config

from detrkit import build_model, load_model, save_model
from detrkit.checkpoint import detect_format, load_train_state, save_run_checkpoint
from detrkit.config import ModelConfig
from detrkit.errors import CheckpointError

TINY = tiny_config(backbone_stages=4, frozen_stages=1, num_queries=5, num_classes=3)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(TINY).eval()


def _same_outputs(a, b):
    x = [torch.randn(3, 64, 80, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        oa, ob = a(x), b(x)
    torch.testing.assert_close(oa["pred_logits"], ob["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(oa["pred_boxes"], ob["pred_boxes"], rtol=0, atol=0)


def test_detrkit_round_trip(model, tmp_path):
    save_model(model, tmp_path / "ckpt", classes=CLASSES)
    assert detect_format(tmp_path / "ckpt") == "detrkit"
    loaded = load_model(tmp_path / "ckpt")
    assert not loaded.training
    assert loaded.config == TINY
    assert [c["id"] for c in loaded.classes] == [3, 7, 12] and loaded.classes[2]["name"] == "star"
    _same_outputs(model, loaded)
    # The weights file alone carries its config too.
    os.remove(tmp_path / "ckpt" / "config.json")
    _same_outputs(model, load_model(tmp_path / "ckpt" / "model.safetensors"))


def test_a_checkpoint_written_before_arch_still_loads(tmp_path):
    """Checkpoints saved before ModelConfig.arch say ``two_stage: true/false``, in config.json and
    in the weights' metadata: they load as the same model."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, arch="two_stage", backbone_stages=3)).eval()
    save_model(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    meta["model"] = {**{k: v for k, v in meta["model"].items() if k != "arch"}, "two_stage": True}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config and type(loaded) is type(model)
    _same_outputs(model, loaded)
    alone = tmp_path / "alone.safetensors"
    save_file(load_file(tmp_path / "ckpt" / "model.safetensors"), str(alone), metadata={"detrkit": json.dumps(meta)})
    _same_outputs(model, load_model(alone))


def _to_official_names(state):
    out = {}
    for k, v in state.items():
        k = k.replace("backbone.body.", "backbone.0.body.", 1) if k.startswith("backbone.body.") else k
        k = k.replace("position.", "backbone.1.", 1) if k.startswith("position.") else k
        out[k] = v
    return out


def test_official_layout_loads_and_reproduces(model, tmp_path):
    path = tmp_path / "detr-tiny.pth"
    # Official training checkpoints keep their argparse arguments: the head count lives there.
    torch.save({"model": _to_official_names(model.state_dict()), "args": argparse.Namespace(nheads=4)}, path)
    assert detect_format(path) == "official"
    loaded = load_model(path)
    assert loaded.config.pre_norm is False and loaded.config.num_queries == 5 and loaded.config.backbone == "resnet18"
    _same_outputs(model, loaded)


def test_official_pre_norm_and_dc5_are_recognised(tmp_path):
    cfg = ModelConfig(backbone="resnet50", d_model=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=64,
                      num_queries=5, num_classes=3, pre_norm=True, dilation=True)
    m = build_model(cfg)
    path = tmp_path / "detr-r50-dc5.pth"
    torch.save({"model": _to_official_names(m.state_dict())}, path)
    loaded = load_model(path)
    assert loaded.config.pre_norm and loaded.config.dilation and loaded.config.backbone == "resnet50"


def test_mismatched_weights_name_every_key(model, tmp_path):
    state = _to_official_names(model.state_dict())
    state["transformer.extra.weight"] = torch.zeros(1)
    del state["transformer.decoder.norm.weight"]
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert "transformer.decoder.norm.weight" in str(e.value) and "transformer.extra.weight" in str(e.value)


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_with_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": _Payload(str(marker))}}, f)
    torch.save({"model": {"x": _Payload(str(marker))}}, tmp_path / "evil2.pth")
    marker.unlink(missing_ok=True)
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="refused"):
            load_model(p)
    assert not marker.exists()


def test_truncated_and_foreign_files_give_clear_errors(model, tmp_path):
    save_model(model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "ckpt")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_model(junk)
    torch.save({"something": 1}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an official DETR checkpoint"):
        load_model(tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# A save killed with SIGKILL: the previous checkpoint (weights and training state together) stays
# ---------------------------------------------------------------------------------------------
SAVE_IN_A_CHILD = """
import json, sys
from pathlib import Path
import torch
from detrkit import build_model
from detrkit.config import ModelConfig
from detrkit.checkpoint import save_run_checkpoint
torch.manual_seed(1)
model = build_model(ModelConfig(**json.loads(sys.argv[2])))
save_run_checkpoint(Path(sys.argv[1]), model, torch.optim.AdamW(model.parameters()),
                    {"epoch": 2, "step": 20}, {"image_size": 64})
"""


def _save_run(folder, model, step):
    save_run_checkpoint(folder, model, torch.optim.AdamW(model.parameters()),
                        {"epoch": step // 10, "step": step}, {"image_size": 64})


SMALL = dataclasses.replace(TINY, backbone_stages=2)  # small files: the saves take no time


@pytest.mark.parametrize("point", ["between-files", "between-renames"])
def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path, point):
    """The child saves over ``last/`` and is killed where DETRKIT_TEST_SAVE_PAUSE stops it: after the
    new weights are written but not the rest, or between the two renames that swap the folders.
    The previous weights and their training state still load, together."""
    torch.manual_seed(0)
    model = build_model(SMALL).eval()
    last = tmp_path / "run" / "last"
    _save_run(last, model, step=10)
    env = {**os.environ, "DETRKIT_TEST_SAVE_PAUSE": point}
    child = subprocess.Popen([sys.executable, "-c", SAVE_IN_A_CHILD, str(last),
                              json.dumps(dataclasses.asdict(SMALL))], env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in child.stderr:  # warnings may come first; EOF if the child ends without pausing
            lines.append(line)
            if line.strip() == f"paused at {point}":
                break
        assert lines and lines[-1].strip() == f"paused at {point}", "".join(lines)
        # The kill lands mid-save: new weights already on disk (not in last/), or the old folder moved aside.
        assert (tmp_path / "run" / ".last.new" / "model.safetensors").exists()
        assert last.exists() == (point != "between-renames")
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    _same_outputs(model, load_model(last))
    assert load_train_state(last)["step"] == 10
    # The next save puts things in order and replaces the previous checkpoint.
    torch.manual_seed(1)
    newer = build_model(SMALL).eval()
    _save_run(last, newer, step=20)
    assert sorted(p.name for p in last.parent.iterdir()) == ["last"]
    _same_outputs(newer, load_model(last))
    assert load_train_state(last)["step"] == 20
    with pytest.raises(AssertionError):  # the two models differ, so the checks above can tell them apart
        _same_outputs(model, newer)


def test_save_refuses_to_replace_a_folder_that_is_not_a_checkpoint(model, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"...")
    with pytest.raises(CheckpointError, match="not a detrkit checkpoint folder"):
        save_model(model, tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.jpg").exists()
    save_model(model, tmp_path / "ckpt")
    save_model(model, tmp_path / "ckpt")  # a checkpoint folder is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "photos"]
