"""router/inflight.py: the router's ledger of what it sent each replica."""
from __future__ import annotations

from router.inflight import MAX_COMPLETED, InFlight, Outstanding, Work


def test_reservation_counts_until_it_expires():
    f = InFlight(ttl_s=5.0)
    f.reserve("r1", "A", Work(16, 800), now=0.0)
    assert f.counts(now=4.9) == {"A": 16}
    assert f.counts(now=5.1) == {}              # never confirmed: a cancelled request


def test_confirm_moves_a_wrong_guess_and_keeps_it_past_the_ttl():
    f = InFlight(ttl_s=5.0)
    f.reserve("r1", "A", Work(16, 100), now=0.0)
    f.confirm("r1", "B", Work(16, 900), now=0.5)  # Ray took the second rank: all its prompt tokens
    assert f.counts(now=100.0) == {"B": 16}
    assert f.outstanding(100.0, {})["B"] == Outstanding(16, 16, 900)
    f.complete("r1", now=100.0)
    assert f.counts(now=100.0) == {}


def test_confirm_at_the_reserved_replica_keeps_the_reserved_work_and_send_time():
    f = InFlight(ttl_s=5.0)
    f.reserve("r1", "A", Work(4, 64), now=1.0)     # 64: the prompt tokens A does not hold cached
    f.confirm("r1", "A", Work(4, 4000), now=2.0)
    assert f.outstanding(10.0, {"A": 1.0})["A"] == Outstanding(4, 4, 64, 0, ((0.0, 64),))


def test_unreserve_drops_only_an_unconfirmed_guess():
    f = InFlight(ttl_s=5.0)
    f.reserve("r1", "A", Work(8), now=0.0)
    f.reserve("r2", "A", Work(4), now=0.0)
    f.confirm("r2", "A", Work(4), now=0.0)
    f.unreserve("r1")
    f.unreserve("r2")
    assert f.counts(now=1.0) == {"A": 4}


def test_a_late_reserve_does_not_downgrade_a_confirmed_request():
    f = InFlight(ttl_s=5.0)
    f.confirm("r1", "A", Work(8), now=0.0)
    f.reserve("r1", "B", Work(8), now=0.0)
    assert f.counts(now=10.0) == {"A": 8}


def test_drop_replica_and_unknown_ids():
    f = InFlight(ttl_s=5.0)
    f.confirm("r1", "A", Work(8), now=0.0, hashes=(1, 2))
    f.confirm("r2", "B", Work(2), now=0.0)
    f.reserve("r3", "A", Work(1), now=0.0)
    f.drop_replica("A")
    f.complete("nope", now=0.0)
    f.unreserve("nope")
    assert f.counts(now=0.0) == {"B": 2}
    assert "A" not in f.prefixes(0.0, {})


def test_recent_work_is_what_was_sent_at_or_after_the_stats_timestamp():
    """Requests sent before the replica's stats were stamped are in those stats (running, backlog);
    only the later ones are added on top. All of them bound the sequence count from below."""
    f = InFlight(ttl_s=5.0)
    f.confirm("old", "A", Work(10, 5000), now=1.0)
    f.reserve("new", "A", Work(2, 300), now=3.0)
    f.reserve("b", "B", Work(1, 50), now=3.0)
    out = f.outstanding(4.0, {"A": 2.0})           # B: no stats, everything is recent
    assert out == {"A": Outstanding(12, 2, 300, 0, ((1.0, 300),)), "B": Outstanding(1, 1, 50)}
    assert f.outstanding(4.0, {"A": 3.0})["A"] == Outstanding(12, 2, 300, 0, ((0.0, 300),))  # at the stamp
    assert f.outstanding(4.0, {"A": float("nan")})["A"] == Outstanding(12, 12, 5300)   # no send times


def test_finished_work_is_what_the_stats_still_show_after_it_completed():
    f = InFlight(ttl_s=5.0)
    f.confirm("old", "A", Work(10, 5000), now=1.0)       # in the stats stamped at 2.0
    f.confirm("quick", "A", Work(3, 10), now=2.5)        # sent and done between two stamps
    f.complete("old", now=3.0)
    f.complete("quick", now=3.0)
    assert f.outstanding(4.0, {"A": 2.0}) == {"A": Outstanding(0, 0, 0, 10)}
    assert f.outstanding(4.0, {"A": 3.5}) == {}          # a publish after the completion covers it
    f.confirm("later", "A", Work(1), now=5.0)
    f.complete("later", now=6.0)
    assert f.outstanding(20.0, {"A": 4.0}) == {}         # keep_prefixes_s passed


def test_prefixes_of_completed_requests_stay_until_the_replica_publishes_after_them():
    f = InFlight(ttl_s=5.0, keep_prefixes_s=10.0)
    f.confirm("r1", "A", Work(1, 100), now=0.0, hashes=(11, 12))
    f.confirm("r2", "A", Work(1, 100), now=0.0, hashes=(11,))
    assert dict(f.prefixes(0.5, {"A": 0.0})["A"]) == {11: 2, 12: 1}
    f.complete("r1", now=1.0)
    assert f.counts(now=1.0) == {"A": 1}                          # its work is done ...
    assert dict(f.prefixes(1.5, {"A": 0.9})["A"]) == {11: 2, 12: 1}  # ... its prefix stays known
    assert dict(f.prefixes(2.0, {"A": 1.2})["A"]) == {11: 1}     # A's stats now cover r1
    f.complete("r2", now=2.0)
    assert "A" not in f.prefixes(20.0, {})                       # keep_prefixes_s passed


def test_newer_stats_do_not_drop_prefixes_an_older_summary_lacks():
    """Stats are taken more often than the prefix summary inside them is rebuilt: reading the
    work against stats stamped after a completion must not forget the completed request's
    prefix, which `prefixes` keeps until the summary's own time passes the completion."""
    f = InFlight(ttl_s=5.0, keep_prefixes_s=10.0)
    f.confirm("r", "A", Work(2, 100), now=0.0, hashes=(7,))
    f.complete("r", now=1.0)
    assert f.outstanding(3.0, {"A": 0.5}) == {"A": Outstanding(0, 0, 0, 2)}   # stats before: still shown
    assert f.outstanding(3.0, {"A": 2.0}) == {}                              # stats after: gone
    assert dict(f.prefixes(3.0, {"A": 0.8})["A"]) == {7: 1}                  # summary before: kept
    assert "A" not in f.prefixes(3.0, {"A": 1.5})                            # summary after: covered


def test_a_request_never_accepted_leaves_no_prefix_behind():
    """A rejected request completes without having been confirmed: its replica never ran it."""
    f = InFlight(ttl_s=5.0)
    f.reserve("r1", "A", Work(1, 100), now=0.0, hashes=(7,))
    assert 7 in f.prefixes(0.0, {})["A"]
    f.complete("r1", now=0.1)
    assert "A" not in f.prefixes(0.1, {})
    f.reserve("r2", "A", Work(1, 100), now=0.0, hashes=(7,))
    f.unreserve("r2")
    assert "A" not in f.prefixes(0.1, {})


def test_completed_entries_are_bounded():
    f = InFlight(ttl_s=5.0, keep_prefixes_s=1e9)
    for i in range(MAX_COMPLETED + 10):
        f.confirm(f"r{i}", "A", Work(1), now=0.0, hashes=(i,))
        f.complete(f"r{i}", now=0.0)
    held = f.prefixes(0.0, {})["A"]
    assert len(held) == MAX_COMPLETED and 0 not in held and MAX_COMPLETED + 9 in held


def test_a_reply_that_beats_its_confirmation_is_not_counted_forever():
    """Ray may deliver a fast request's completion before on_request_routed: the late confirm
    must not bring the finished request back."""
    f = InFlight(ttl_s=5.0)
    f.reserve("r1", "A", Work(2, 10), now=0.0)
    f.complete("r1", now=0.1)
    f.confirm("r1", "A", Work(2, 10), now=0.2)
    assert f.counts(now=100.0) == {}


def test_a_rejected_request_is_reserved_and_confirmed_again_on_retry():
    f = InFlight(ttl_s=5.0)
    f.reserve("r1", "A", Work(2, 10), now=0.0)
    f.complete("r1", now=0.1)                    # A rejected it; Ray retries
    f.reserve("r1", "B", Work(2, 10), now=0.2)
    f.confirm("r1", "B", Work(2, 10), now=0.3)
    assert f.counts(now=100.0) == {"B": 2}


def test_with_peers_scales_what_the_stats_cannot_show_yet():
    from router.inflight import Outstanding
    o = Outstanding(sequences=3, recent_sequences=2, recent_prompt_tokens=700, finished_sequences=1,
                    recent_sends=((0.1, 300), (0.2, 400)))
    assert o.with_peers(1) is o
    assert o.with_peers(3) == Outstanding(sequences=3, recent_sequences=6, recent_prompt_tokens=2100,
                                          finished_sequences=3, recent_sends=((0.1, 900), (0.2, 1200)))


def test_recent_work_reads_only_what_was_added_since_the_stats_and_stays_exact():
    """Many requests long in flight, a few sent since the stats, and a reservation sent before the
    stats but confirmed at another replica after them (added late, sent early): the recent view
    holds exactly the requests sent at or after the stats' time, in send order."""
    f = InFlight(ttl_s=5.0)
    for i in range(200):                                    # sent at 0.00 .. 1.99, confirmed
        f.reserve(f"old{i}", "A", Work(1, 10), now=i / 100)
        f.confirm(f"old{i}", "A", Work(1, 10), now=i / 100)
    f.reserve("moved", "B", Work(2, 50), now=9.5)           # guessed B before the stats ...
    f.reserve("new1", "A", Work(3, 30), now=10.2)
    f.confirm("moved", "A", Work(2, 70), now=10.3)          # ... Ray took A after them
    f.reserve("new2", "A", Work(4, 40), now=10.4)
    o = f.outstanding(10.5, {"A": 10.0})["A"]
    assert o.sequences == 200 + 2 + 3 + 4
    assert (o.recent_sequences, o.recent_prompt_tokens) == (3 + 4, 30 + 40)
    assert [(round(age, 6), tokens) for age, tokens in o.recent_sends] == [(0.2, 30), (0.4, 40)]
    f.complete("new1", now=10.6)
    f.drop_replica("B")
    assert f.outstanding(10.6, {"A": 10.0})["A"].recent_sequences == 4
    assert f.outstanding(10.6, {})["A"].recent_sequences == 200 + 2 + 4   # no stats: all of it
