"""``detrkit`` under torchrun, as ``python -m detrkit`` runs it, with two test hooks (tests/test_distributed.py):

* rank 0 copies ``last/`` (and the metrics next to it) to ``OUT/epoch1`` after the first
  checkpoint, so the test can compare the weights after one step with a single process;
* in the first attempt, rank 1 kills itself (SIGKILL) in the middle of epoch 2, before its
  second step, so that torchrun's ``--max-restarts`` restarts both processes.
"""
import os
import shutil
import signal
import sys
from pathlib import Path

import detrkit.engine as engine
import detrkit.run as run
from detrkit.cli import main

RANK = int(os.environ["RANK"])
FIRST_ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
OUT = Path(sys.argv[sys.argv.index("--out") + 1])

real_save, real_forward_backward = run.save_run_checkpoint, engine.Trainer.forward_backward
steps = 0


def save_and_keep_the_first(folder, *args, **kwargs):
    real_save(folder, *args, **kwargs)
    if FIRST_ATTEMPT and not (OUT / "epoch1").exists():
        shutil.copytree(folder, OUT / "epoch1")
        for name in ("metrics.json", "detections.json"):
            shutil.copy(OUT / name, OUT / "epoch1" / name)


def forward_backward_or_die(self, micro_batches):
    global steps
    steps += 1
    if RANK == 1 and FIRST_ATTEMPT and steps == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_forward_backward(self, micro_batches)


run.save_run_checkpoint = save_and_keep_the_first
engine.Trainer.forward_backward = forward_backward_or_die
sys.exit(main(sys.argv[1:]))
