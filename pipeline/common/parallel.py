"""Many volumes at once on one machine: a process pool over cases (shards for many machines: ``pipeline.data.shards``).

``prepare`` and ``infer`` hand their per-case function to :func:`map_cases`: with one worker it runs in this
process, with more in a pool of processes forked from a fork server (not from this process: torch's and OpenMP's
threads do not survive a fork of a process that has used them), each with its share of the CPU threads. The fork
server imports torch, MONAI and the pipeline once, so a worker starts in milliseconds instead of seconds. Results
come back in input order whatever order the cases finish in, so outputs and manifests do not depend on the number
of workers. A case that fails with bad input (:class:`InputDataError`, ``OSError``) is returned as its error and the
others go on, unless ``strict``; Ctrl-C cancels the cases not yet started and the running ones clean up their
temporary folders (every case is written to a temporary name and renamed into place), so no half case is left.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, TypeVar

from transforms.errors import InputDataError

__all__ = ["map_cases", "CASE_ERRORS"]

T = TypeVar("T")
# What a bad case raises; anything else is a bug and stops the run.
CASE_ERRORS = (InputDataError, OSError)


def map_cases(
    func: Callable[[T], Any],
    items: Sequence[T],
    workers: int = 1,
    *,
    strict: bool = False,
    on_done: Callable[[int, Any, BaseException | None], None] | None = None,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> list[tuple[Any, BaseException | None]]:
    """``func(item)`` for every item, in ``workers`` processes; ``[(result, None) or (None, error)]`` in input order.

    Args:
        func: a module-level function (it is pickled to the workers); ``items`` must pickle too.
        workers: 1 runs everything here, in order.
        strict: re-raise the first case error instead of recording it.
        on_done: called here as ``on_done(index, result, error)`` when a case finishes (progress output).
        initializer: run once per worker process (and once here when ``workers == 1``) with ``initargs``, e.g. to
            load a model.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results: list[tuple[Any, BaseException | None]] = [(None, None)] * len(items)
    if workers == 1 or len(items) <= 1:
        if initializer is not None:
            initializer(*initargs)
        for k, item in enumerate(items):
            try:
                results[k] = (func(item), None)
            except CASE_ERRORS as exc:
                if strict:
                    raise
                results[k] = (None, exc)
            if on_done is not None:
                on_done(k, *results[k])
        return results
    threads = max(1, (os.cpu_count() or 1) // workers)
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # the fork server imports these once; each worker is then a fork of it instead of a fresh interpreter
        context.set_forkserver_preload(["torch", "monai", "pipeline.infer.batch", "pipeline.data.prepare"])
    else:  # Windows: fresh interpreters
        context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(threads, initializer, initargs)) as pool:
        pending = {pool.submit(func, item): k for k, item in enumerate(items)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=pending.__getitem__):
                    k = pending.pop(future)
                    error = future.exception()
                    if error is not None and (strict or not isinstance(error, CASE_ERRORS)):
                        raise error
                    results[k] = (None, error) if error is not None else (future.result(), None)
                    if on_done is not None:
                        on_done(k, *results[k])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # running cases finish or clean up; queued ones never start
            raise
    return results


def _start_worker(threads: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    import torch

    torch.set_num_threads(threads)  # N workers x all cores would oversubscribe the CPU many times over
    if initializer is not None:
        initializer(*initargs)
