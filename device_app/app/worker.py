"""One background thread for everything slow (bundle loading, inference, the audit
log's fsync, frame analysis), so the UI never blocks on it. Results come back to the UI
thread through ``Clock.schedule_once``."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from kivy.clock import Clock

log = logging.getLogger("auditlens.app")


class Worker:
    """A single worker thread running jobs in order (the interpreter is not shared
    between threads, and the log's appends stay in capture order)."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="auditlens-worker", daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """True when no job is queued, running, or waiting to deliver its result."""
        with self._lock:
            return self._pending == 0

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def submit(self, job: Callable[[], object], on_done: Callable[[object], None],
               on_error: Callable[[BaseException], None] | None = None) -> None:
        """Run ``job()`` on the worker; then ``on_done(result)`` (or ``on_error(exc)``)
        on the UI thread."""
        with self._lock:
            self._pending += 1
        self._queue.put((job, on_done, on_error))

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, on_done, on_error = item
            try:
                result = job()
            except BaseException as exc:  # noqa: BLE001 - handed to the UI thread
                log.exception("auditlens worker job failed")
                Clock.schedule_once(lambda _dt, e=exc, cb=on_error: self._deliver(cb, e), 0)
            else:
                Clock.schedule_once(lambda _dt, r=result, cb=on_done: self._deliver(cb, r), 0)

    def _deliver(self, callback, value) -> None:
        try:
            if callback is not None:
                callback(value)
        finally:
            with self._lock:
                self._pending -= 1
