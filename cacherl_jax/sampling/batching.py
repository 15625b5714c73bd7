"""`BatchingEngine`: one worker thread runs the sampler, batching the requests that wait together.

Callers on many threads (the HTTP server's request handlers, the thinking pipeline's teacher
threads) each `submit` a prompt with one `SamplingParams` per wanted generation and block until
theirs are done. The worker takes every request waiting (up to `max_batch` rows), waits
`batch_window_s` for more, and runs them as one `Sampler.generate` call with per-row sampling
settings. Every row's randomness depends only on its own seed and positions, so batching never
changes what a request gets.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cacherl_jax.sampling.sampler import Generation, Sampler, SamplingParams


@dataclasses.dataclass
class _Pending:
    prompt_ids: list[int]
    sampling: list[SamplingParams]
    future: concurrent.futures.Future


class BatchingEngine:
    """Runs the sampler on one worker thread, batching the requests that wait together."""

    def __init__(self, sampler: Sampler, *, max_batch: int = 32, batch_window_s: float = 0.01):
        self.sampler = sampler
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.batch_sizes: list[int] = []  # requests per batch run, for logs and tests
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], sampling: list[SamplingParams]) -> list[Generation]:
        """Blocks until this request's generations are ready (one per SamplingParams)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Pending(prompt_ids, sampling, future))
        return future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _take_batch(self) -> list[_Pending] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch, rows = [first], len(first.sampling)
        deadline = time.monotonic() + self.batch_window_s
        while rows < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # finish this batch, then stop
                break
            batch.append(item)
            rows += len(item.sampling)
        return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            prompts = [p.prompt_ids for p in batch for _ in p.sampling]
            sampling = [s for p in batch for s in p.sampling]
            try:
                generations = self.sampler.generate(prompts, sampling)
            except Exception as err:  # hand the failure to every waiting request
                for pending in batch:
                    pending.future.set_exception(err)
                continue
            self.batch_sizes.append(len(batch))
            start = 0
            for pending in batch:
                stop = start + len(pending.sampling)
                pending.future.set_result(generations[start:stop])
                start = stop
