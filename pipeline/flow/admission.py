"""Admission under the staleness bound: when the rollout manager may start a group, and whether a finished group
may be kept.

Contract (s = rollout.max_staleness, B = trainer.batch_size, E = weight_sync.every, v = the engines' version):
- Step k trains version floor((k-1)/E), so a group admitted under version w (its start version) is trained in
  time iff it is among the first cap(w) = (w + s + 1) * E * B groups the trainer takes. The invariant:
      K(<=w) + R(<=w) <= cap(w)    for every start version w
  K: groups kept (cumulative, consumed or not, minus any the buffer dropped as stale); U_w: unresolved groups of
  start version w; R_w <= U_w: their reservations, how many of them may still be kept; (<=w): summed over start
  versions <= w. A reservation is granted only under the invariant for w = v (when every group has a start
  version <= v), and nothing adds to K(<=w) + R(<=w) afterwards: a kept group uses a reservation, and older
  versions get none. The buffer hands out oldest start version first and, told R by every status frame
  (`pending`), never lets a younger group take a slot a reservation may need (EDF). So no kept group is ever
  trained more than s versions after its start version (AReaL's capacity argument), and s = 0 is exactly
  synchronous.
- Reservations are granted to the current version only: R_v = min(U_v, cap(v) - K - R(<v)). (Granting one to an
  older version later could hand it a trainer slot the buffer has already given to a younger group.) R_w is a
  pool, not a ticket: the first groups of start version w to finish kept use it, and a filtered or re-queued
  group's reservation passes to another unresolved group of the same w (R_w = min(R_w, U_w)).
- `keep(w)`: a group the filter keeps is kept only if R_w has one left; otherwise the manager re-queues its prompt
  (`rollout/requeued_over_admitted`, its tokens counted wasted). `hopeless()`: start versions whose unresolved
  groups can never be kept (no reservation left, none can come): the manager cancels and re-queues them at once.
- Admission of a group under version v (`may_admit`): while U_v < cap(v) - K - R(<v), the new group gets a
  reservation (with no dynamic sampling, or rollout.over_admission = 0, this is the whole rule: every unfinished
  group counts as kept). Beyond that, while the expected keeps p * U_v still fall short of
  it and fewer than ceil(rollout.over_admission * B) unresolved groups have no reservation (the memory bound).
  Why: dynamic sampling filters a share of the groups, and a filtered group is only known when its slowest sample
  ends; counting it as kept until then leaves engine slots idle near the bound. The over-admitted groups fill
  them, and whichever finish kept first are trained; the surplus is what over-admission costs.
- p, the keep rate: the share kept among the filter's last `window` decisions, with one kept pseudo-decision as
  the prior (p = 1 before any decision: no over-admission until the filter has been seen to drop groups).
"""

from __future__ import annotations

import math
from collections import Counter, deque


class AdmissionControl:
    def __init__(
        self,
        max_staleness: int,
        batch_size: int,
        sync_every: int,
        over_admission: float = 0.0,
        window: int | None = None,
    ):
        self.s, self.B, self.E = max_staleness, batch_size, sync_every
        self.extra = math.ceil(over_admission * batch_size)
        """Most unresolved groups without a reservation."""
        self.version = 0
        self.kept = 0
        """K, cumulative (the buffer's stale drops are subtracted in `need`)."""
        self.stale_dropped = 0
        self._unresolved: Counter = Counter()  # U_w
        self._reserved: Counter = Counter()  # R_w
        self._decisions: deque[bool] = deque(maxlen=window or max(32, 2 * batch_size))

    # ------------------------------------------------------------------ the rule
    def cap(self, w: int) -> int:
        """(w + s + 1) * E * B: the groups the trainer takes up to the last step that may train start version w."""
        return (w + self.s + 1) * self.E * self.B

    def need(self) -> int:
        """Kept groups of the current start version the bound can still take: cap(v) - K - R(<v)."""
        older = sum(n for w, n in self._reserved.items() if w < self.version)
        return self.cap(self.version) - (self.kept - self.stale_dropped) - older

    def keep_rate(self) -> float:
        return (sum(self._decisions) + 1) / (len(self._decisions) + 1)

    def speculative(self) -> int:
        """Unresolved groups without a reservation (over-admitted)."""
        return sum(self._unresolved.values()) - sum(self._reserved.values())

    def may_admit(self) -> bool:
        need, u = self.need(), self._unresolved[self.version]
        return u < need or (self.keep_rate() * u < need and self.speculative() < self.extra)

    def hopeless(self) -> list[int]:
        """Start versions with unresolved groups that can never be kept. The current version's still can while an
        older reservation may be released (it frees room under cap(v))."""
        older_reserved = any(n for w, n in self._reserved.items() if w < self.version)
        return [
            w
            for w, u in self._unresolved.items()
            if u and not self._reserved[w] and (w < self.version or not older_reserved)
        ]

    # ------------------------------------------------------------------ events
    def set_version(self, version: int, stale_dropped: int | None = None) -> None:
        self.version = int(version)
        if stale_dropped is not None:
            self.stale_dropped = int(stale_dropped)
        self._grant()

    def admitted(self) -> bool:
        """A group starts under the current version; returns whether it got a reservation."""
        self._unresolved[self.version] += 1
        self._grant()
        return self._reserved[self.version] == self._unresolved[self.version]

    def observe(self, keep: bool) -> None:
        """A decision of the dynamic-sampling filter (the keep-rate estimate)."""
        self._decisions.append(bool(keep))

    def keep(self, w: int) -> bool:
        """Whether a finished group of start version w that the filter keeps may be kept (uses a reservation)."""
        return self._reserved[w] > 0

    def resolved(self, w: int, kept: bool) -> None:
        """A group of start version w left the unresolved set: kept (after `keep(w)`), or not (filtered,
        re-queued, given up)."""
        self._unresolved[w] -= 1
        if kept:
            self._reserved[w] -= 1
            self.kept += 1
        self._reserved[w] = min(self._reserved[w], self._unresolved[w])
        if not self._unresolved[w]:
            del self._unresolved[w], self._reserved[w]
        self._grant()

    def _grant(self) -> None:
        v = self.version
        if self._unresolved[v]:
            self._reserved[v] = max(0, min(self._unresolved[v], self.need()))
        else:
            self._unresolved.pop(v, None)
            self._reserved.pop(v, None)

    # ------------------------------------------------------------------ views
    def reserved(self) -> dict[int, int]:
        """R by start version (nonzero): what the buffer's EDF check must assume may still be kept."""
        return {w: n for w, n in sorted(self._reserved.items()) if n}

    def unresolved(self) -> dict[int, int]:
        return dict(sorted(self._unresolved.items()))

    def metrics(self) -> dict[str, float]:
        return {
            "rollout/keep_rate_est": self.keep_rate(),
            "rollout/speculative_groups": float(self.speculative()),
            "rollout/reserved_groups": float(sum(self._reserved.values())),
            "rollout/admission_budget": float(self.need() - self._unresolved[self.version]),
        }
