"""AdmissionControl (pipeline/flow/admission.py) as pure logic: the conservative rule without filtering, over-admission
against the keep rate within its cap, reservations as a pool, hopeless groups, and the hard bound on a random
trace of admissions, outcomes and version changes."""

import random
from collections import Counter

from pipeline.flow.admission import AdmissionControl


def fill(a: AdmissionControl) -> int:
    n = 0
    while a.may_admit():
        a.admitted()
        n += 1
    return n


def observe(a: AdmissionControl, kept: int, of: int) -> None:
    for i in range(of):
        a.observe(i < kept)


def resolve(a: AdmissionControl, w: int, *kept: bool) -> None:
    for k in kept:
        a.resolved(w, kept=k)


def test_without_filtering_every_unfinished_group_counts_as_kept():
    # s=1, E=2, B=3 at v=0: (0+1+1)*2*3 = 12 groups, all with a reservation, whatever the over-admission cap
    a = AdmissionControl(max_staleness=1, batch_size=3, sync_every=2, over_admission=1.0)
    assert fill(a) == 12 and a.speculative() == 0 and a.reserved() == {0: 12}
    b = AdmissionControl(max_staleness=1, batch_size=3, sync_every=2, over_admission=0.0)
    observe(b, kept=16, of=32)  # a 50% keep rate changes nothing when over-admission is off
    assert fill(b) == 12 and b.speculative() == 0


def test_over_admits_against_the_keep_rate_within_the_cap():
    # s=0, B=4: 4 groups can be kept at v=0. The cap is ceil(1.0 * 4) = 4 groups without a reservation.
    for kept, expect in ((24, 6), (16, 8), (4, 8)):  # keep rate 25/33: 6 groups; 17/33: 8; 5/33: capped at 8
        a = AdmissionControl(max_staleness=0, batch_size=4, sync_every=1, over_admission=1.0)
        observe(a, kept=kept, of=32)
        assert fill(a) == expect, (kept, a.keep_rate())
        assert a.reserved() == {0: 4} and a.speculative() == expect - 4
        assert a.unresolved() == {0: expect}


def test_reservations_are_a_pool_and_the_surplus_is_not_kept():
    a = AdmissionControl(max_staleness=0, batch_size=2, sync_every=1, over_admission=1.0)
    observe(a, kept=0, of=8)
    assert fill(a) == 4 and a.reserved() == {0: 2}
    a.resolved(0, kept=False)  # a filtered group's reservation passes to another unresolved group
    assert a.reserved() == {0: 2} and a.speculative() == 1
    for _ in range(2):  # the first two to finish kept use the pool
        assert a.keep(0)
        a.resolved(0, kept=True)
    assert a.kept == 2 and a.reserved() == {} and a.unresolved() == {0: 1}
    assert not a.keep(0)  # the last one would be a third kept group of version 0: past the bound
    assert a.hopeless() == [0]  # and nothing can make room for it: the manager cancels it
    a.resolved(0, kept=False)
    a.set_version(1)
    assert a.hopeless() == [] and fill(a) == 4 and a.reserved() == {1: 2}  # cap(1) = 4: two more, plus two spare


def test_an_older_reservation_keeps_the_current_version_hopeful():
    # s=1, B=1, keep rate 1/2: v=0 reserves 2 and over-admits 2. At v=1 one v0 group is still out with its
    # reservation; a v1 group beyond cap(1) - K - R(<1) waits for it to be released rather than being cancelled.
    a = AdmissionControl(max_staleness=1, batch_size=1, sync_every=1, over_admission=2.0)
    observe(a, kept=1, of=3)
    assert fill(a) == 4 and a.reserved() == {0: 2}
    resolve(a, 0, True, False, False)
    a.set_version(1)  # need = cap(1) - K - R(<1) = 3 - 1 - 1 = 1; keep rate 1/2: two v1 groups
    assert fill(a) == 2 and a.reserved() == {0: 1, 1: 1} and a.speculative() == 1
    assert a.hopeless() == []
    a.resolved(1, kept=True)  # v1's reservation used; the other two v1 groups now depend on the v0 one
    assert not a.keep(1) and a.hopeless() == []
    a.resolved(0, kept=False)  # released: its room goes to version 1
    assert a.reserved() == {1: 1} and a.keep(1)


def test_random_traces_keep_the_hard_bound_and_the_memory_bound():
    for seed in range(40):
        rng = random.Random(seed)
        s, B, E = rng.randint(0, 2), rng.randint(1, 4), rng.randint(1, 2)
        a = AdmissionControl(max_staleness=s, batch_size=B, sync_every=E, over_admission=rng.choice([0, 0.5, 2.0]))
        groups: list[int] = []  # start versions of the unresolved groups
        kept = Counter()  # kept groups by start version
        frozen: dict[int, int] = {}  # reservations of versions no longer current
        for _ in range(400):
            r = rng.random()
            if r < 0.45 and a.may_admit():
                a.admitted()
                groups.append(a.version)
            elif r < 0.9 and groups:
                w = groups.pop(rng.randrange(len(groups)))
                passed = rng.random() < 0.6  # the filter's decision; kept only with a reservation (as the manager)
                keep = passed and a.keep(w)
                a.observe(passed)
                a.resolved(w, kept=keep)
                kept[w] += keep
            elif r < 0.95:
                a.set_version(a.version + 1)
            for w in a.hopeless():  # the manager cancels them
                while w in groups:
                    groups.remove(w)
                    a.resolved(w, kept=False)
            reserved = a.reserved()
            for w in range(a.version):  # an older version's reservations never grow
                n = reserved.get(w, 0)
                assert n <= frozen.get(w, n), (seed, w)
                frozen[w] = n
            for w in range(a.version + 1):  # every kept or reserved group of start <= w fits before its deadline
                k = sum(n for u, n in kept.items() if u <= w)
                assert k + sum(n for u, n in reserved.items() if u <= w) <= a.cap(w), (seed, w)
            assert a.speculative() <= a.extra  # memory: at most `extra` groups beyond the reservations
            assert sum(a.unresolved().values()) == len(groups)


def test_an_older_version_without_reservations_left_is_hopeless():
    # s=2, B=1, keep rate 1/2. v1's only reservation is used while a v0 group still holds one: at v=2 the spare v1
    # group can never be kept (no reservation is ever granted to an older version), the v0 group still can.
    a = AdmissionControl(max_staleness=2, batch_size=1, sync_every=1, over_admission=2.0)
    observe(a, kept=1, of=3)
    assert fill(a) == 5 and a.reserved() == {0: 3}
    resolve(a, 0, True, True, False)
    a.set_version(1)  # need = cap(1) - K - R(<1) = 4 - 2 - 1 = 1
    assert fill(a) == 2 and a.reserved() == {0: 1, 1: 1}
    a.resolved(1, kept=True)
    a.set_version(2)
    assert a.unresolved() == {0: 2, 1: 1} and a.reserved() == {0: 1}
    assert a.hopeless() == [1]
