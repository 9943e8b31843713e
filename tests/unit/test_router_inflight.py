"""router/inflight.py: the router's own count of sequences sent to each replica."""
from __future__ import annotations

from router.inflight import InFlight


def test_reservation_counts_until_it_expires():
    f = InFlight(ttl_s=5.0)
    f.reserve("r1", "A", 16, now=0.0)
    assert f.counts(now=4.9) == {"A": 16}
    assert f.counts(now=5.1) == {}              # never confirmed: a cancelled request


def test_confirm_moves_a_wrong_guess_and_keeps_it_past_the_ttl():
    f = InFlight(ttl_s=5.0)
    f.reserve("r1", "A", 16, now=0.0)
    f.confirm("r1", "B", 16)                     # Ray took the second rank
    assert f.counts(now=100.0) == {"B": 16}
    f.complete("r1")
    assert f.counts(now=100.0) == {}


def test_unreserve_drops_only_an_unconfirmed_guess():
    f = InFlight(ttl_s=5.0)
    f.reserve("r1", "A", 8, now=0.0)
    f.reserve("r2", "A", 4, now=0.0)
    f.confirm("r2", "A", 4)
    f.unreserve("r1")
    f.unreserve("r2")
    assert f.counts(now=1.0) == {"A": 4}


def test_a_late_reserve_does_not_downgrade_a_confirmed_request():
    f = InFlight(ttl_s=5.0)
    f.confirm("r1", "A", 8)
    f.reserve("r1", "B", 8, now=0.0)
    assert f.counts(now=10.0) == {"A": 8}


def test_drop_replica_and_unknown_ids():
    f = InFlight(ttl_s=5.0)
    f.confirm("r1", "A", 8)
    f.confirm("r2", "B", 2)
    f.reserve("r3", "A", 1, now=0.0)
    f.drop_replica("A")
    f.complete("nope")
    f.unreserve("nope")
    assert f.counts(now=0.0) == {"B": 2}
