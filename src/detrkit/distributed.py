"""Several processes, one model: the ``torch.distributed`` setup that ``torchrun`` asks for.

``torchrun --nproc_per_node N -m detrkit train ...`` starts N copies of the command and gives
each the environment variables ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` (and ``TORCHELASTIC_RESTART_COUNT`` when it restarts them after a failure).
:func:`setup` reads them: with ``WORLD_SIZE > 1`` it joins the process group (NCCL on CUDA,
Gloo on CPU) and picks the process's GPU (``cuda:LOCAL_RANK``). Without them everything here
is the identity and training runs in one process, as before.

Every helper below is a no-op (or returns its input) in a single process, so the training
loop is written once. The device a process runs on is chosen here too (:func:`select_device`,
and what its CPU is good at: :func:`note_slow_bf16`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 writes files and prints progress; the others only compute."""
    return rank() == 0


def restart_count() -> int:
    """How many times ``torchrun`` has restarted this worker group after a failure (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def select_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when there is a GPU, else the CPU; any other name is taken as it is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU as Linux lists them (empty elsewhere)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines() if line.startswith("flags")), set())


def note_slow_bf16(precision: str, device: str) -> None:
    """Tell the user when bf16 was asked for on a CPU whose bf16 products are not fast (no AMX)."""
    if precision != "bf16" or select_device(device).type != "cpu":
        return
    flags = cpu_flags()
    if flags and "amx_bf16" not in flags:
        print("note: --precision bf16 on a CPU without AMX: its bfloat16 matrix products are no faster than "
              "float32 ones (half as fast on the machine of docs/benchmarks.md), so fp32 is likely faster here",
              file=sys.stderr)


def setup(device_name: str) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment; return this process's device.

    ``device_name`` is ``auto``, ``cpu`` or ``cuda[:i]``. Under ``torchrun`` a CUDA device means
    ``cuda:LOCAL_RANK`` (one GPU per process); the index in ``cuda:i`` is ignored.
    """
    device = select_device(device_name)
    wants_cuda = device.type == "cuda"
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if is_distributed():  # already joined (the Python API called twice in one process)
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if wants_cuda else "cpu")
    if wants_cuda:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(device)  # before the first collective: NCCL binds to the current device
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``values`` over all processes (every process gets the same result)."""
    return all_sum(values) / world_size()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``values`` over all processes."""
    if not is_distributed():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process if ``flag`` is True on any: the way processes agree to stop together."""
    if not is_distributed():
        return flag
    return bool(all_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def gather_to_main(obj: Any) -> Optional[list]:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None on the others (objects are pickled)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
