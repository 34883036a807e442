"""A write that must not hold up the loop that decides it: :class:`LatestWriter`.

The GPN and GIN/GEN agents publish their acknowledgements in etcd after each pass. That
write took 3-32 ms here (an etcd round trip from a Python process whose GIL three watch
threads share) and held the agent's loop: the outbound SA of a migration, which lands a
few milliseconds after the inbound one, waited for the inbound one's acknowledgement to
be written before the agent even looked at it. Only the latest acknowledgement matters
(each says "everything up to revision R is applied"), so a writer thread takes the
newest value submitted, writes it, and the loop goes on at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["LatestWriter"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_NOTHING = object()


class LatestWriter(Generic[T]):
    """Writes the newest submitted item with ``write(item)`` in its own thread; an item
    submitted while another waits replaces it. ``on_error(item, exc)`` is called (in the
    writer's thread) when ``write`` raises; the item is not retried: the owner decides
    (the agents forget what they acknowledged and the next pass writes again)."""

    def __init__(self, name: str, write: Callable[[T], None],
                 on_error: Callable[[T, Exception], None] | None = None) -> None:
        self._write = write
        self._on_error = on_error
        self._cond = threading.Condition()
        self._pending: object = _NOTHING
        self._busy = False
        self._stopped = False
        # started by the first submit: an agent that never writes holds no thread
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def submit(self, item: T) -> None:
        with self._cond:
            if self._stopped:
                raise RuntimeError("LatestWriter is stopped")
            self._pending = item
            if self._thread.ident is None:
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted is written (or failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is _NOTHING and not self._busy, timeout)

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is pending, then end the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            started = self._thread.ident is not None
        if started:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not _NOTHING or self._stopped)
                if self._pending is _NOTHING:
                    return  # stopped, nothing left
                item, self._pending = self._pending, _NOTHING
                self._busy = True
            try:
                self._write(item)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - reported to the owner, never fatal
                if self._on_error is not None:
                    try:
                        self._on_error(item, exc)  # type: ignore[arg-type]
                    except Exception:  # noqa: BLE001
                        log.exception("%s: error handler failed", self._thread.name)
                else:
                    log.warning("%s: write failed: %s", self._thread.name, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
