"""The glibc allocator settings the CLI applies at start-up: they keep freed memory for reuse."""
import os
import platform
import subprocess
import sys

import pytest

from detrkit import cli

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="mallopt settings exist on Linux/glibc only")

# Six 3 MiB tensors, allocated, written and freed, five times over (the pattern of a forward
# pass); prints whether the settings were applied and the page faults of the five rounds.
PROGRAM = """
import resource
import torch
from detrkit.allocator import tune_allocator
print(tune_allocator())
def one_round():
    blocks = [torch.empty(3 << 18).fill_(1.0) for _ in range(6)]
    del blocks
one_round()
one_round()  # the heap reaches its working size
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(env: dict) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))} | env
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@glibc
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    applied, faults = _run({})
    # The user's own choice wins: with a MALLOC_ knob in the environment nothing is changed.
    kept, default_faults = _run({"MALLOC_MMAP_MAX_": "65536"})
    assert (applied, kept) == ("True", "False")
    assert default_faults > 5 * 6 * 768 / 2  # glibc's defaults: the blocks are faulted in again, page by page
    # Measured here: 0 or 768 faults (one block's pages, now and then) against 23070; the bar
    # leaves room for a few such blocks.
    assert faults < default_faults / 5, (faults, default_faults)


def test_the_cli_applies_the_settings_at_start_up(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "tune_allocator", lambda: calls.append(1))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert calls == [1]
