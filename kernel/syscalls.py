"""The syscall queue: calls submitted from any thread, applied in the kernel's loop thread
between steps, in the order they came. A call that raises `Defer` is kept and applied
again after the next step.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from agentos.kernel.errors import EngineClosedError

Call = tuple[Callable, tuple, Future]


class Defer(Exception):
    """Raised by a syscall that must wait for the next step; it is retried then."""


class SyscallQueue:
    def __init__(self):
        self._calls: deque[Call] = deque()
        self._deferred: list[Call] = []
        self._cv = threading.Condition()
        self.closed = False

    def submit(self, fn: Callable, args: tuple) -> Future:
        """Queues fn(*args); returns its Future (failed with EngineClosedError once closed)."""
        fut: Future = Future()
        with self._cv:
            if self.closed:
                fut.set_exception(EngineClosedError("engine is closed"))
                return fut
            self._calls.append((fn, args, fut))
            self._cv.notify()
        return fut

    def close(self) -> bool:
        """Refuses new calls and wakes the loop. Returns False when it was closed already."""
        with self._cv:
            if self.closed:
                return False
            self.closed = True
            self._cv.notify()
        return True

    def wait(self, idle: Callable[[], bool]) -> list[Call] | None:
        """Blocks while nothing is queued and idle() holds (it is asked again after each
        submission); returns the queued calls, taking them, or None once closed."""
        with self._cv:
            while not self._calls and not self.closed and idle():
                self._cv.wait()
            if self.closed:
                return None
            calls = list(self._calls)
            self._calls.clear()
        return calls

    def apply(self, calls: list[Call]) -> None:
        """Runs the calls (in the loop thread), setting their Futures; a call that raises
        Defer is kept for `retry`."""
        for fn, args, fut in calls:
            if fut.cancelled():
                continue
            try:
                result = fn(*args)
            except Defer:
                self._deferred.append((fn, args, fut))
            except BaseException as e:  # noqa: BLE001 - delivered to the caller
                fut.set_exception(e)
            else:
                fut.set_result(result)

    def retry(self) -> None:
        """Applies the deferred calls again (after a step)."""
        if self._deferred:
            retry, self._deferred = self._deferred, []
            self.apply(retry)

    def drain(self, error: Exception) -> None:
        """Fails every queued and deferred call with error."""
        with self._cv:
            pending = list(self._calls) + self._deferred
            self._calls.clear()
            self._deferred = []
        for _, _, fut in pending:
            if not fut.done():
                fut.set_exception(error)
