"""What a device announces on the network, and how `edge-agent discover` reads it
back (no network here: the records themselves; tests/integration/test_discovery.py
sends them across a real link)."""

from __future__ import annotations

import ipaddress

import ifaddr
import pytest

from edge_agent.cli import main
from edge_agent.discovery import (
    Announcement,
    Device,
    device_from_info,
    plan_announcement,
    service_info,
)


def adapter(name: str, *addresses: str) -> ifaddr.Adapter:
    ips = [ifaddr.IP((a, 0, 0) if ":" in a else a, 64 if ":" in a else 24, name)
           for a in addresses]
    return ifaddr.Adapter(name, name, ips)


# A Pi on Wi-Fi with IPv6, a cable to a laptop without DHCP, and a container bridge.
PI = [
    adapter("lo", "127.0.0.1", "::1"),
    adapter("wlan0", "192.168.1.20", "fe80::ba27:ebff:fe01:2345", "2001:db8::20"),
    adapter("eth0", "169.254.7.7"),
    adapter("wg0", "fd00::5"),
]


def test_a_wildcard_listen_announces_every_ipv4_address_another_machine_can_reach() -> None:
    # Routable addresses first: a browser that cannot tell which one it reaches
    # takes the first.
    assert plan_announcement(["0.0.0.0"], 8640, PI) == Announcement(
        8640, ("192.168.1.20", "169.254.7.7"), ("192.168.1.20", "169.254.7.7"))


def test_an_ipv6_wildcard_adds_the_routable_ipv6_addresses_but_not_link_local_ones() -> None:
    # fe80:: needs a scope a DNS record cannot carry; mDNS speaks IPv4 here, so
    # wg0, which has no IPv4 address, hears no question and is not announced.
    assert plan_announcement(["::"], 8640, PI) == Announcement(
        8640, ("192.168.1.20", "2001:db8::20", "169.254.7.7"), ("192.168.1.20", "169.254.7.7"))


def test_a_listen_address_announces_only_itself_on_its_own_interface() -> None:
    assert plan_announcement(["192.168.1.20"], 8641, PI) == Announcement(
        8641, ("192.168.1.20",), ("192.168.1.20",))
    assert plan_announcement(["2001:db8::20"], 8641, PI) == Announcement(
        8641, ("2001:db8::20",), ("192.168.1.20",))


def test_nothing_is_announced_before_the_network_is_up() -> None:
    only_loopback = PI[:1]
    assert plan_announcement(["0.0.0.0"], 8640, only_loopback) is None
    # An address that no interface holds (yet), or one mDNS cannot speak from.
    assert plan_announcement(["10.1.2.3"], 8640, PI) is None
    assert plan_announcement(["fd00::5"], 8640, PI) is None


def test_the_records_carry_id_version_and_path_and_read_back_as_a_device() -> None:
    info = service_info("site-12.mic_A", Announcement(
        8640, ("192.168.1.20", "2001:db8::20"), ("192.168.1.20",)), "1.4.0")
    # What any DNS-SD browser (avahi-browse, dns-sd) shows of the device.
    assert info.type == "_edge-agent._tcp.local."
    assert info.name == "site-12.mic_A._edge-agent._tcp.local."
    assert info.properties == {b"txtvers": b"1", b"id": b"site-12.mic_A", b"version": b"1.4.0",
                               b"path": b"/"}
    assert info.server == "edge-agent-site-12-mic-a.local."
    assert device_from_info(info) == Device(
        device="site-12.mic_A", url="http://192.168.1.20:8640/", address="192.168.1.20:8640",
        addresses=["192.168.1.20", "2001:db8::20"], port=8640, version="1.4.0",
        name="site-12.mic_A", host="edge-agent-site-12-mic-a.local")


def test_discover_shows_first_the_address_on_its_own_network() -> None:
    # The Pi answers with both addresses on both links; a laptop on the cable
    # without DHCP reaches only 169.254.7.7, one on the Wi-Fi 192.168.1.20.
    info = service_info("mic", Announcement(8640, ("192.168.1.20", "169.254.7.7"),
                                            ("192.168.1.20", "169.254.7.7")), "1.4.0")
    on_cable = device_from_info(info, [ipaddress.ip_network("169.254.0.0/16")])
    on_wifi = device_from_info(info, [ipaddress.ip_network("192.168.1.0/24")])
    assert on_cable is not None and on_wifi is not None
    assert on_cable.url == "http://169.254.7.7:8640/"
    assert on_cable.addresses == ["169.254.7.7", "192.168.1.20"]
    assert on_wifi.url == "http://192.168.1.20:8640/"


def test_a_device_reached_over_ipv6_only_gets_a_bracketed_url() -> None:
    info = service_info("mic-6", Announcement(8640, ("2001:db8::20",), ("192.168.1.20",)),
                        "1.4.0")
    device = device_from_info(info)
    assert device is not None
    assert (device.address, device.url) == ("[2001:db8::20]:8640", "http://[2001:db8::20]:8640/")


@pytest.mark.parametrize("seconds", ["0", "-1", "601", "nan"])
def test_discover_refuses_a_wait_it_cannot_use(capsys: pytest.CaptureFixture[str],
                                               seconds: str) -> None:
    assert main(["discover", "--seconds", seconds]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"error: --seconds {float(seconds):g}: expected a number of seconds above 0, "
                   "at most 600\n")
