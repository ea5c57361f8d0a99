from __future__ import annotations

import itertools

from shoal.election import Candidate, Election, ElectionSettings, choose_master, next_term
from shoal.types.ids import NodeId

LIVENESS = 1.0


def cand(
    node: str,
    *,
    term: int = 0,
    last_index: int = 0,
    force: bool = False,
    master: bool = False,
    heard_at: float = 10.0,
) -> Candidate:
    return Candidate(NodeId(node), term, last_index, force, master, heard_at)


def test_no_live_candidate_means_no_master() -> None:
    assert choose_master([], now=10.0, liveness_s=LIVENESS) is None
    assert choose_master([cand("a", heard_at=5.0)], now=10.0, liveness_s=LIVENESS) is None


def test_fresh_cluster_picks_smallest_id() -> None:
    nodes = [cand("c"), cand("a"), cand("b")]
    assert choose_master(nodes, 10.0, LIVENESS) == "a"


def test_highest_last_index_beats_id_and_term() -> None:
    nodes = [cand("a", term=5, last_index=9), cand("b", term=1, last_index=10), cand("c", last_index=3)]
    assert choose_master(nodes, 10.0, LIVENESS) == "b"


def test_term_breaks_last_index_tie() -> None:
    nodes = [cand("a", term=1, last_index=10), cand("b", term=2, last_index=10)]
    assert choose_master(nodes, 10.0, LIVENESS) == "b"


def test_force_master_wins_over_everything() -> None:
    nodes = [cand("a", term=3, last_index=50, master=True), cand("z", force=True)]
    assert choose_master(nodes, 10.0, LIVENESS) == "z"


def test_incumbent_keeps_role_when_a_follower_catches_up() -> None:
    nodes = [cand("b", term=1, last_index=10, master=True), cand("a", term=1, last_index=10)]
    assert choose_master(nodes, 10.0, LIVENESS) == "b"


def test_two_claimants_settle_on_higher_term_then_same_order() -> None:
    assert (
        choose_master([cand("a", term=1, master=True), cand("b", term=2, master=True)], 10.0, LIVENESS) == "b"
    )
    same = [cand("b", term=2, last_index=4, master=True), cand("a", term=2, last_index=4, master=True)]
    assert choose_master(same, 10.0, LIVENESS) == "a"


def test_dead_incumbent_is_replaced_by_most_complete_log() -> None:
    nodes = [
        cand("a", term=1, last_index=20, master=True, heard_at=8.0),
        cand("b", term=1, last_index=19),
        cand("c", term=1, last_index=20),
    ]
    assert choose_master(nodes, 10.0, LIVENESS) == "c"


def test_choice_does_not_depend_on_order() -> None:
    nodes = [cand("b", last_index=3), cand("a", last_index=3), cand("c", last_index=2), cand("d", term=1)]
    choices = {choose_master(list(p), 10.0, LIVENESS) for p in itertools.permutations(nodes)}
    assert choices == {"a"}


def test_next_term_is_above_every_term_seen() -> None:
    assert next_term([], own_term=0) == 1
    assert next_term([cand("a", term=4), cand("b", term=2)], own_term=3) == 5


def test_election_waits_to_settle_then_follows_peers() -> None:
    election = Election(NodeId("b"), ElectionSettings(liveness_s=LIVENESS, settle_s=1.0), started_at=0.0)
    me = cand("b", heard_at=0.0)
    assert election.decide(me, now=0.5).master is None
    election.observe(cand("a", heard_at=0.6))
    decision = election.decide(me, now=1.2)
    assert decision.master == "a" and not decision.is_self
    # a goes silent: b takes over
    decision = election.decide(me, now=3.0)
    assert decision.master == "b" and decision.is_self


def test_election_follows_an_existing_master_without_waiting() -> None:
    election = Election(NodeId("a"), ElectionSettings(liveness_s=LIVENESS, settle_s=5.0), started_at=0.0)
    election.observe(cand("z", term=3, last_index=7, master=True, heard_at=0.1))
    decision = election.decide(cand("a", last_index=9), now=0.2)
    assert decision.master == "z"
    assert election.max_term_seen(0.2) == 3


def test_a_follower_does_not_crown_itself_with_its_masters_first_events() -> None:
    """b heard a's heartbeat from before a took the role (not master, index 0), then applied a's first
    events (index 2). Its longer log came from a: a is master, b keeps following it."""
    election = Election(NodeId("b"), ElectionSettings(liveness_s=LIVENESS, settle_s=1.0), started_at=0.0)
    election.observe(cand("a", heard_at=1.0))
    me = cand("b", term=1, last_index=2)
    assert election.decide(me, now=1.1).master == "b"  # what the stale heartbeat alone would make b do
    election.observe_master(NodeId("a"), last_index=2, now=1.1)
    decision = election.decide(me, now=1.2)
    assert decision.master == "a" and not decision.is_self
    # events are heard like heartbeats: a stays live while they come, and is replaced once both stop
    assert election.decide(me, now=2.0).master == "a"
    assert election.decide(me, now=2.2).master == "b"
    # events name a master only among peers this node has heard (never itself)
    election.observe_master(NodeId("c"), last_index=9, now=2.2)
    election.observe_master(NodeId("b"), last_index=9, now=2.2)
    assert [c.node_id for c in election.peers(2.2)] == []
