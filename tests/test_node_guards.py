"""Pure pieces the node relies on: role backoff, election with ineligible nodes, advertised address."""

from __future__ import annotations

import logging

import pytest

from shoal.election import Candidate, choose_master
from shoal.node_guards import MessageDrops, RoleBackoff
from shoal.node_startup import advertised_host
from shoal.types import NetworkInterface, NodeId


def test_backoff_doubles_with_failures_in_a_row_and_resets_after_a_healthy_term() -> None:
    backoff = RoleBackoff(base_s=1.0, max_s=8.0, healthy_after_s=30.0)
    assert backoff.eligible(0.0)
    pauses = [backoff.failed(started_at=t, now=t + 0.1) for t in (0.0, 10.0, 20.0, 30.0, 40.0)]
    assert pauses == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert not backoff.eligible(40.1 + 7.9) and backoff.eligible(40.1 + 8.0)
    assert backoff.failed(started_at=100.0, now=200.0) == 1.0  # that term lasted: a fresh count
    assert backoff.num_failures_total == 6


def test_ineligible_node_is_passed_over_even_when_it_has_the_longest_log() -> None:
    def candidate(node: str, last_index: int, eligible: bool = True, force: bool = False) -> Candidate:
        return Candidate(NodeId(node), 1, last_index, force, False, 0.0, eligible)

    crashing = candidate("a", 100, eligible=False)
    assert choose_master([crashing, candidate("b", 90)], now=0.0, liveness_s=1.0) == "b"
    forced_but_crashing = candidate("a", 100, eligible=False, force=True)
    assert choose_master([forced_but_crashing, candidate("b", 90)], now=0.0, liveness_s=1.0) == "b"
    assert choose_master([crashing], now=0.0, liveness_s=1.0) is None


def test_wildcard_bind_advertises_an_interface_address() -> None:
    interfaces = (
        NetworkInterface(name="lo", addresses=("127.0.0.1", "::1")),
        NetworkInterface(name="eth0", addresses=("fe80::1", "2001:db8::5", "192.168.1.20")),
    )
    assert advertised_host("0.0.0.0", interfaces) == "192.168.1.20"
    only_v6 = (interfaces[0], NetworkInterface(name="e", addresses=("2001:db8::5",)))
    assert advertised_host("::", only_v6) == "2001:db8::5"
    assert advertised_host("0.0.0.0", interfaces[:1]) == "127.0.0.1"
    assert advertised_host("10.1.2.3", interfaces) == "10.1.2.3"


def test_message_drops_count_every_one_and_log_rarely(caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    drops = MessageDrops(clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="shoal.node"):
        for i in range(200):
            clock[0] = i * 0.1  # 20 s of one bad message every 100 ms
            drops.count("undecodable", "x", "bad json")
    assert drops.counts["undecodable"] == 200 and drops.total == 200
    assert len(caplog.records) == 2
