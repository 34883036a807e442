"""Records an agent refused, and what keeps a bad record from stopping an agent.

Every agent reads records other programs wrote (the CLI, the GMN, operators with
``etcdctl``). One malformed record must cost exactly that record: the agent skips it,
counts it, logs it once per version (key, revision and reason: never the value, which
may hold a key), and publishes the list under ``refused/<role>/<node>`` (under its
lease) where ``protego status`` shows it. A record leaves the list when it is deleted
or rewritten (a rewrite that is still bad is refused again, and logged again).

What is not a bad record (a bug, an exception nobody expected) must not be survived
silently either: :func:`fatal_threads` makes an uncaught exception in any thread of an
agent's process a fatal error, so the ``run`` command exits non-zero and systemd or
the container runtime restarts it.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from protego.control.model import PREFIX

log = logging.getLogger(__name__)

MAX_LISTED = 50  # records named in the published report (the count covers all)
MAX_REASON = 300  # characters of a reason kept (reasons never carry values)


def refused_key(role: str, node: str) -> str:
    return f"{PREFIX}refused/{role}/{node}"


class RefusedRecords:
    """Thread-safe: key -> (mod_revision, reason, since) of the records skipped."""

    def __init__(self, role: str, node: str, clock: Callable[[], float] = time.time) -> None:
        self.role = role
        self.node = node
        self._clock = clock
        self._lock = threading.Lock()
        self._cur: dict[str, tuple[int, str, float]] = {}
        self.total = 0  # refusals over the agent's life (each version of a record once)
        self.version = 0  # bumped by every change of the list (publishers compare it)

    def refuse(self, key: str, revision: int, reason: str) -> bool:
        """Record that ``key`` at ``revision`` was skipped. Logs and returns True the
        first time this version of the record is refused for this reason."""
        reason = reason[:MAX_REASON]
        with self._lock:
            cur = self._cur.get(key)
            if cur is not None and cur[0] == revision and cur[1] == reason:
                return False
            self._cur[key] = (revision, reason, cur[2] if cur is not None and cur[0] == revision else self._clock())
            self.total += 1
            self.version += 1
        log.error("%s %s: record %s (revision %d) refused, skipped: %s", self.role, self.node,
                  key.removeprefix(PREFIX), revision, reason)
        return True

    def accept(self, key: str) -> None:
        """``key`` is good (again): it leaves the list."""
        with self._lock:
            if self._cur.pop(key, None) is not None:
                self.version += 1

    def replace(self, refusals: dict[str, str]) -> None:
        """The whole list at once (an agent that re-derives it at every pass): key ->
        reason; the records not named leave it (revision 0: not known)."""
        for key, reason in refusals.items():
            self.refuse(key, 0, reason)
        with self._lock:
            gone = [k for k in self._cur if k not in refusals]
            for k in gone:
                del self._cur[k]
            if gone:
                self.version += 1

    def prune(self, revision_of: Callable[[str], int | None]) -> None:
        """Forget the records that were deleted (``revision_of`` gives None) or rewritten
        since they were refused; those still bad are refused again when next read."""
        with self._lock:
            gone = [k for k, (rev, _r, _s) in self._cur.items() if revision_of(k) != rev]
            for k in gone:
                del self._cur[k]
            if gone:
                self.version += 1

    def keys(self, prefix: str = "") -> set[str]:
        with self._lock:
            return {k for k in self._cur if k.startswith(prefix)}

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._cur

    def __len__(self) -> int:
        with self._lock:
            return len(self._cur)

    def report(self) -> dict[str, Any]:
        """What ``refused/<role>/<node>`` holds."""
        with self._lock:
            items = sorted(self._cur.items())
            total = self.total
        return {
            "role": self.role, "node": self.node, "count": len(items), "refusals": total,
            "records": [{"key": k.removeprefix(PREFIX), "revision": rev,
                         "reason": reason, "since": since} for k, (rev, reason, since) in items[:MAX_LISTED]],
        }


class RefusedPublisher:
    """Writes a :class:`RefusedRecords`' report when it changed (from the agent's loop).
    ``put(key, obj)`` writes under the agent's lease; a failed write is retried at the
    next call."""

    def __init__(self, refused: RefusedRecords, put: Callable[[str, dict[str, Any]], Any],
                 delete: Callable[[str], Any] | None = None) -> None:
        self.refused = refused
        self._put = put
        self._delete = delete
        self._published: int | None = None

    def publish(self) -> bool:
        """True when a write was made."""
        version = self.refused.version
        if version == self._published:
            return False
        key = refused_key(self.refused.role, self.refused.node)
        if len(self.refused) == 0 and self._delete is not None and self._published is not None:
            self._delete(key)
        elif len(self.refused) or self._published is None:
            self._put(key, self.refused.report())
        self._published = version
        return True

    def invalidate(self) -> None:
        """Write again at the next :meth:`publish` (e.g. after a new lease)."""
        self._published = None


class FatalThreads:
    """Process-wide: a thread that dies of an uncaught exception makes the process fail.

    ``install()`` sets :data:`threading.excepthook`; the ``run`` command waits on
    :attr:`event` beside its signals and exits non-zero when it is set. Exceptions
    while the process is already stopping (``stopping()``) are logged only."""

    def __init__(self, on_fatal: Callable[[], None] | None = None) -> None:
        self.event = threading.Event()
        self.on_fatal = on_fatal  # called (from the dying thread) once the event is set
        self.reason: str | None = None
        self._stopping = False
        self._previous: Any = None

    def install(self) -> FatalThreads:
        self._previous = threading.excepthook
        threading.excepthook = self._hook
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            threading.excepthook = self._previous
            self._previous = None

    def stopping(self) -> None:
        self._stopping = True

    def _hook(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        tb = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        if self._stopping:
            log.warning("thread %s failed while stopping: %s", name, tb.rstrip())
            return
        log.critical("thread %s died: %s; the agent stops (exit status 70) so its supervisor restarts it",
                     name, tb.rstrip())
        if self.reason is None:
            self.reason = f"thread {name} died: {args.exc_type.__name__}: {args.exc_value}"
        self.event.set()
        if self.on_fatal is not None:
            self.on_fatal()


EXIT_THREAD_DIED = 70  # EX_SOFTWARE
