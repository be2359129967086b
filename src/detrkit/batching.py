"""Micro-batching for a server: concurrent requests gathered into one model call.

Used by :mod:`detrkit.serve`; nothing here knows about HTTP or the model. :class:`Batcher` runs
in an asyncio event loop and calls the model in one worker thread, so the loop stays free while a
batch runs; :func:`run_grouped` splits a batch of images by size, since padding an image to a
larger neighbour's size changes its detections (see :mod:`detrkit.serve`).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional


class Batcher:
    """Gathers concurrent items into batches for ``run`` (called in one worker thread).

    ``run(items) -> results`` gets at most ``max_batch`` items and returns one result per item.
    A batch is closed when it is full or ``max_wait_ms`` after its first item was submitted;
    items that waited while the previous batch ran go at once. An exception in ``run`` is the
    answer of every item of that batch; the next batch runs as usual.
    """

    def __init__(self, run: Callable[[list], list], max_batch: int, max_wait_ms: float) -> None:
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.queue: Optional[asyncio.Queue] = None
        self.batches = 0
        self._task: Optional[asyncio.Task] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detrkit-model")

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, item):
        """The result of ``item``, computed in a batch with the items submitted around it."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future, time.monotonic()))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = batch[0][2] + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                if time.monotonic() >= deadline:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
            batch = [entry for entry in batch if not entry[1].done()]  # clients that went away
            if not batch:
                continue
            self.batches += 1
            try:
                results = await loop.run_in_executor(self._executor, self.run, [item for item, _, _ in batch])
            except Exception as e:  # noqa: BLE001 - the batch's requests get the error, the server goes on
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future, _), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


def run_grouped(detect: Callable[[list], list], images: list) -> list[tuple[dict, int, float]]:
    """``detect`` on ``images`` in groups of one size: ``(detections, group size, ms)`` per image."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.size, []).append(i)
    results: list = [None] * len(images)
    for members in groups.values():
        start = time.perf_counter()
        dets = detect([images[i] for i in members])
        ms = (time.perf_counter() - start) * 1000
        for i, det in zip(members, dets):
            results[i] = (det, len(members), ms)
    return results
