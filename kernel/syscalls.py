"""The syscall queue: calls submitted from any thread, applied in the kernel's loop thread
between steps, in the order they came. A call that raises `Defer` is kept and applied
again after the next step.

`try_now` is the fast path of calls that only edit the kernel's tables (fork, snapshot,
rollback, close, info...): when the loop is between steps and nothing is queued, the call
runs at once in the caller's thread under `mutex`, which the loop holds whenever it
applies calls or runs a step. That saves the two thread handoffs of the queue (tens of
microseconds each); when the loop is busy, the call is queued as before.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

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
        # held by the loop thread while it applies calls or steps, and by a `try_now`
        # caller while its call runs; the loop never holds it while waiting for _cv, and a
        # caller never takes _cv while holding it
        self.mutex = threading.Lock()
        # try_now callers that waited for the mutex, and how many of them have taken it: the
        # loop lets in those waiting when its turn ends (not later arrivals: a stream of
        # callers must not starve the loop)
        self._arrived = self._entered = 0
        self._served = threading.Condition(threading.Lock())

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
        # NOTE: idle() is read without the mutex, while a try_now call may be running: it
        # must read atomically (a flag, a container's truth), and a call that makes work
        # notifies after it, so a stale "idle" is followed by a wake-up
        with self._cv:
            while not self._calls and not self.closed and idle():
                self._cv.wait()
            if self.closed:
                return None
            calls = list(self._calls)
            self._calls.clear()
        return calls

    def try_now(self, fn: Callable, args: tuple, after: Callable[[], bool],
                block: bool = True) -> tuple[bool, Any]:
        """Runs fn(*args) in this thread between the loop's steps, unless a call is queued
        before it; then after() (the journal's commit), which says whether the loop has
        work now. The loop is woken only then: woken for nothing, it would look at its
        state while the caller's next call comes.

        With `block`, waits for the step in progress to end (the loop lets such callers
        in before its next turn); without, runs only if the loop is between steps now.
        Returns (True, fn's result), raising what fn raised, or (False, None) when it did
        not run (calls are queued, the queue is closed, the loop is busy and not `block`,
        or fn raised Defer): queue it then."""
        if self._calls or self.closed:
            return False, None
        if block:
            with self._served:
                self._arrived += 1
            self.mutex.acquire()
            with self._served:
                self._entered += 1
                self._served.notify_all()
        elif not self.mutex.acquire(blocking=False):
            return False, None
        wake = False
        try:
            if self._calls or self.closed:
                return False, None
            try:
                return True, fn(*args)
            except Defer:  # raised before any change: the queue retries it after a step
                return False, None
            finally:
                wake = after()
        finally:
            self.mutex.release()
            if wake:  # the call queued work (a wakened session); never under the mutex
                with self._cv:
                    self._cv.notify()

    def let_waiters_in(self) -> None:
        """Called by the loop between turns, holding no lock: returns once the try_now
        callers waiting for the mutex now have taken it (callers arriving meanwhile wait
        for the next turn's end)."""
        with self._served:
            waiting = self._arrived
            while self._entered < waiting and not self.closed:
                self._served.wait()

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
