"""When may the status handover write a changed policy: :class:`FlushSchedule` (pure, time passed in).

At most one write per policy per interval, a short settle after an idle period,
and deferral of roll-out progress (``enforcement.holds_progress``) with a
bounded re-check while reports keep arriving.
"""

from __future__ import annotations


class FlushSchedule:
    """When may a changed policy be written: at most once per ``interval``, ``settle`` after an idle period.

    ``mark`` records a change; ``due`` lists the policies whose write may happen
    now; ``wrote`` starts the policy's interval; ``clean`` drops a change that
    needed no write (it does not start an interval); ``defer`` keeps a change
    pending until a later time (roll-out progress held back).
    """

    def __init__(self, interval: float, settle: float = 0.05, recheck: float = 0.2) -> None:
        self.interval = interval
        self.settle = min(settle, interval)
        self.recheck = min(recheck, interval)
        self._dirty: dict[str, float] = {}
        self._last_write: dict[str, float] = {}
        self._not_before: dict[str, float] = {}
        self._deferred_at: dict[str, float] = {}

    def mark(self, uid: str, now: float) -> bool:
        """Record a change; True when its write time moved earlier (clean before, or a deferral shortened).

        A change to a deferred policy brings its next look forward to
        ``recheck`` after it was deferred (it may be deferred again then): however
        many changes arrive, a deferred policy is looked at no more often than
        that, and a roll-out that completes is written at most ``recheck`` (or
        the interval since the last write) later.
        """
        if uid not in self._dirty:
            self._dirty[uid] = now
            return True
        held = self._not_before.get(uid)
        if held is None:
            return False
        sooner = self._deferred_at[uid] + self.recheck
        if sooner < held:
            self._not_before[uid] = sooner
            return True
        return False

    def _ready_at(self, uid: str, since: float) -> float:
        last = self._last_write.get(uid)
        ready = since + self.settle if last is None else max(since + self.settle, last + self.interval)
        return max(ready, self._not_before.get(uid, ready))

    def due(self, now: float) -> list[str]:
        return sorted(uid for uid, since in self._dirty.items() if self._ready_at(uid, since) <= now)

    def next_deadline(self) -> float | None:
        return min((self._ready_at(u, s) for u, s in self._dirty.items()), default=None)

    def last_write(self, uid: str) -> float | None:
        return self._last_write.get(uid)

    def defer(self, uid: str, until: float, now: float) -> None:
        """Keep ``uid``'s change pending; it is not due before ``until`` (or a new change, see ``mark``)."""
        self._dirty.setdefault(uid, until)
        self._not_before[uid] = until
        self._deferred_at[uid] = now

    def wrote(self, uid: str, now: float) -> None:
        self.clean(uid)
        self._last_write[uid] = now

    def clean(self, uid: str) -> None:
        self._dirty.pop(uid, None)
        self._not_before.pop(uid, None)
        self._deferred_at.pop(uid, None)

    def forget(self, uid: str) -> None:
        self.clean(uid)
        self._last_write.pop(uid, None)

    @property
    def pending(self) -> int:
        return len(self._dirty)
