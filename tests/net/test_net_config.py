import json

import pytest
import zenoh

from shoal.net.config import TransportSettings, is_loopback_endpoint, parse_endpoint


def test_production_default_discovers_on_the_lan() -> None:
    settings = TransportSettings.lan("home", peers=("tcp/192.168.1.5:7447",))
    config = settings.zenoh_config_dict()
    assert config["mode"] == "peer"
    assert config["scouting"]["multicast"]["enabled"] is True
    assert config["scouting"]["multicast"]["interface"] == "auto"
    assert config["listen"]["endpoints"] == ["tcp/[::]:0"]
    assert config["connect"]["endpoints"] == ["tcp/192.168.1.5:7447"]
    assert not settings.is_loopback_only()


def test_loopback_settings_never_reach_a_real_interface() -> None:
    settings = TransportSettings.loopback("ci", port=7000, peers=("tcp/127.0.0.1:7001",))
    config = settings.zenoh_config_dict()
    assert config["scouting"]["multicast"]["enabled"] is False
    assert config["listen"]["endpoints"] == ["tcp/127.0.0.1:7000"]
    assert settings.is_loopback_only()
    with pytest.raises(ValueError, match="non-loopback peer"):
        TransportSettings.loopback("ci", port=7000, peers=("tcp/10.0.0.2:7001",))
    with pytest.raises(ValueError, match="non-loopback peer"):
        TransportSettings.loopback("ci", port=7000, peers=("tcp/localhost.example.com:7001",))


def test_zenoh_accepts_the_generated_config() -> None:
    for settings in [
        TransportSettings.lan("home", port=7447, multicast_interface="eth0"),
        TransportSettings.loopback("ci", port=7000, peers=("tcp/127.0.0.1:7001",)),
    ]:
        config = settings.zenoh_config()
        assert json.loads(config.get_json("mode")) == "peer"
        assert json.loads(config.get_json("scouting/multicast/enabled")) is settings.multicast_scouting
        assert json.loads(config.get_json("listen/endpoints")) == list(settings.listen)
    with pytest.raises(zenoh.ZError, match="unknown field"):
        zenoh.Config.from_json5('{"scouting": {"multicats": {}}}')


@pytest.mark.parametrize(
    ("endpoint", "parsed"),
    [
        ("tcp/192.168.1.5:7447", ("tcp", "192.168.1.5", 7447)),
        ("tcp/[::1]:7447", ("tcp", "::1", 7447)),
        ("udp/node-3.lan:1", ("udp", "node-3.lan", 1)),
    ],
)
def test_parse_endpoint(endpoint: str, parsed: tuple[str, str, int]) -> None:
    assert parse_endpoint(endpoint) == parsed


@pytest.mark.parametrize(
    "endpoint", ["192.168.1.5:7447", "tcp/host", "tcp/host:99999", "http/h:1", "tcp/a b:1"]
)
def test_invalid_endpoints_are_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        parse_endpoint(endpoint)
    with pytest.raises(ValueError, match="endpoint"):
        TransportSettings("c", listen=(endpoint,))


def test_loopback_endpoint_detection() -> None:
    assert is_loopback_endpoint("tcp/127.0.0.1:1")
    assert is_loopback_endpoint("tcp/[::1]:1")
    assert not is_loopback_endpoint("tcp/[::]:1")
    assert not is_loopback_endpoint("tcp/0.0.0.0:1")
    assert not is_loopback_endpoint("tcp/localhost:1")  # a name may resolve anywhere


@pytest.mark.parametrize("name", ["", "a/b", "a*", "x" * 65, "sp ace"])
def test_invalid_cluster_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="cluster name"):
        TransportSettings(name, listen=("tcp/127.0.0.1:1",))
