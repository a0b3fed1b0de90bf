"""Dynamic sampling (DAPO): keep a group only if its responses disagree on correctness.

Contract: `dynamic_sampling_filter(group)` keeps a group iff the standard deviation of its samples' `acc` is > 0,
i.e. it holds at least one correct and one wrong response; otherwise every advantage of the group would be 0 and
the group would only dilute the batch. The decision's reason is one of `kept`, `all_correct`, `all_wrong`, `empty`
(a group without samples). `FilterCounters` tallies decisions by reason for the metrics
(`filter/kept`, `filter/dropped`, `filter/drop_<reason>`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pipeline.contracts.records import Group

DROP_REASONS = ("all_correct", "all_wrong", "empty")


@dataclass(frozen=True)
class FilterDecision:
    keep: bool
    reason: str  # kept | all_correct | all_wrong | empty


def dynamic_sampling_filter(group: Group) -> FilterDecision:
    """Keep iff std(acc) > 0 over the group's samples (some right, some wrong)."""
    accs = group.accs
    if not accs:
        return FilterDecision(False, "empty")
    n_correct = sum(bool(a) for a in accs)
    if n_correct == len(accs):
        return FilterDecision(False, "all_correct")
    if n_correct == 0:
        return FilterDecision(False, "all_wrong")
    return FilterDecision(True, "kept")


@dataclass
class FilterCounters:
    """Running counts of filter decisions by reason (not thread-safe; one owner, e.g. the buffer)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, decision: FilterDecision) -> FilterDecision:
        self.counts[decision.reason] += 1
        return decision

    @property
    def kept(self) -> int:
        return self.counts["kept"]

    @property
    def dropped(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason != "kept")

    def to_metrics(self) -> dict[str, float]:
        """{"filter/kept", "filter/dropped", "filter/drop_<reason>" for every known reason} as floats."""
        out = {"filter/kept": float(self.kept), "filter/dropped": float(self.dropped)}
        for reason in sorted(set(DROP_REASONS) | (set(self.counts) - {"kept"})):
            out[f"filter/drop_{reason}"] = float(self.counts[reason])
        return out

    def reset(self) -> None:
        self.counts.clear()
