"""``serve``'s model threads: model work starts by priority, then in order, on ``worker.concurrency``
threads (one by default: one item at a time)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from records.tables import ROUTINE_PRIORITY


class ModelThread(Executor):
    """An executor with ``threads`` threads and a priority queue (a lower number first, as on the gpu
    queue), so that a radiologist's question overtakes the routine analyses waiting for the model.
    With several threads, the items running share the in-process engine's decode steps."""

    def __init__(self, name: str = "model", threads: int = 1) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Future[Any] | None, Callable[[], None]]] = \
            queue.PriorityQueue()
        self._order = itertools.count()
        self._shutdown = False
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{n}", daemon=True) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while True:
            _, _, future, work = self._queue.get()
            if future is None:
                return
            work()

    def submit_at(self, priority: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()

        def work() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

        with self._lock:
            if self._shutdown:
                raise RuntimeError("the model thread has stopped")
            self._queue.put((priority, next(self._order), future, work))
        return future

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.submit_at(ROUTINE_PRIORITY, fn, *args, **kwargs)

    def waiting(self) -> int:
        """Work submitted and not yet started (the embedded layout's queue depth)."""
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads) and not self._shutdown

    @property
    def stopped(self) -> bool:
        """Every thread has ended: after ``shutdown``, nothing it ran is still running."""
        return not any(thread.is_alive() for thread in self._threads)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None) -> None:
        """``cancel_futures`` drops the work not started (``serve``'s stop: the database holds it);
        ``timeout`` bounds the wait for the items running, which are abandoned after it (daemon threads)."""
        with self._lock:
            if not self._shutdown:
                self._shutdown = True
                while cancel_futures:
                    try:  # get_nowait: a thread may take the last item after a check of empty()
                        _, _, future, _ = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if future is not None:
                        future.cancel()
                # one stop mark per thread, after everything still queued
                for _ in self._threads:
                    self._queue.put((1 << 30, next(self._order), None, lambda: None))
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for thread in self._threads:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
