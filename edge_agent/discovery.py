"""Found on the network: the agent announces its device API over mDNS/DNS-SD, and
`edge-agent discover` lists the devices that do.

A device whose API listens beyond loopback registers one DNS-SD service of type
``_edge-agent._tcp.local.``, named after its device id: the SRV record gives the
API's port, the A/AAAA records the addresses it answers on, and the TXT record
``txtvers=1``, ``id`` (the device id), ``version`` and ``path`` (where the API
and the device page start). `browse` asks for that type and reads the answers
back as `Device` values.

Why threads: python-zeroconf's async API belongs to asyncio, and the agent runs
on Trio. Its thread-based API (`Zeroconf`, `ServiceInfo`, `ServiceBrowser`) runs
an asyncio loop in a thread of its own; its blocking calls (opening the sockets;
registering, which probes the name for about 1.5 s; closing, which sends the
goodbye) are made from worker threads through `ThreadRunner`, so the Trio thread
never waits on the network and never hosts a second event loop (a trio-asyncio
bridge would be one more dependency for the same result).

The machine's addresses are read again every `REFRESH_SECONDS`: a Pi whose Wi-Fi
comes up after the agent, or that gets a new DHCP lease, is announced on its new
addresses, the old announcement withdrawn first. mDNS itself speaks IPv4, on the
interfaces that carry the announced addresses.

A stage: imports only the bottom layer (config, blocking, supervisor, wire).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Final, Literal
from urllib.parse import urlsplit

import ifaddr
import msgspec
import trio
from zeroconf import (
    DNSQuestionType,
    InterfaceChoice,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf import Error as ZeroconfError

from .blocking import ThreadRunner
from .config import ApiConfig, listen_host
from .errors import EdgeAgentError
from .supervisor import TaskStatus
from .wire import agent_version

__all__ = [
    "API_PATH",
    "REFRESH_SECONDS",
    "SERVICE_TYPE",
    "AdvertiseStats",
    "Advertiser",
    "Announcement",
    "Device",
    "DiscoveryError",
    "browse",
    "device_from_info",
    "plan_announcement",
    "service_info",
]

log = logging.getLogger(__name__)

#: The DNS-SD service type every agent registers.
SERVICE_TYPE: Final = "_edge-agent._tcp.local."
#: Where the device API (and its page) starts, as the TXT record's ``path`` says.
API_PATH: Final = "/"
#: How often the agent reads its addresses again, to follow network changes.
REFRESH_SECONDS: Final = 10.0
# The longest the goodbye may hold up a shutdown.
_CLOSE_SECONDS: Final = 2.0
# How long `browse` waits for one device's records it has not yet got.
_RESOLVE_MS: Final = 1000
# Failures of the network or of zeroconf: logged and retried, the agent goes on.
_NETWORK_ERRORS: Final = (OSError, RuntimeError, ZeroconfError)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
AdvertiseState = Literal["advertising", "waiting", "off", "failing"]


class DiscoveryError(EdgeAgentError):
    """mDNS cannot be used here: no interface to ask on, or its socket is refused."""


# ----------------------------------------------------------------------------
# What to announce


@dataclass(frozen=True)
class Announcement:
    """What one registration announces: the API's port, the addresses it answers
    on, and the IPv4 addresses of the interfaces mDNS speaks on."""

    port: int
    addresses: tuple[str, ...]
    interfaces: tuple[str, ...]


def _reachable(ip: IPAddress) -> bool:
    """An address another machine can use: not loopback, and not IPv6 link-local
    (it needs a scope a DNS record cannot carry). IPv4 link-local stays: a Pi
    cabled straight to a laptop has nothing else."""
    return not ip.is_loopback and not (ip.version == 6 and ip.is_link_local)


def _adapter_ips(adapter: ifaddr.Adapter) -> list[IPInterface]:
    """An adapter's addresses with their networks (ifaddr gives IPv6 ones as
    ``(address, flowinfo, scope_id)``)."""
    return [ipaddress.ip_interface(
        f"{ip.ip if isinstance(ip.ip, str) else ip.ip[0]}/{ip.network_prefix}")
        for ip in adapter.ips]


def _preference(ip: IPAddress) -> tuple[bool, int, IPAddress]:
    """Sort key: routable before link-local, IPv4 before IPv6."""
    return ip.is_link_local, ip.version, ip


def _sorted(ips: Iterable[IPAddress]) -> tuple[str, ...]:
    return tuple(str(ip) for ip in sorted(set(ips), key=_preference))


def plan_announcement(bound: Collection[str], port: int,
                      adapters: Iterable[ifaddr.Adapter]) -> Announcement | None:
    """What to announce for an API bound to the addresses ``bound`` on ``port``,
    on a machine with these network ``adapters``; None when none of them holds an
    address another machine can reach (no network yet).

    ``0.0.0.0`` in ``bound`` stands for every IPv4 address, ``::`` for every
    address (Linux binds it dual-stack); any other entry for itself. mDNS speaks
    IPv4, so an interface without an IPv4 address is not announced.
    """
    def wanted(ip: IPAddress) -> bool:
        return ("::" in bound or ("0.0.0.0" in bound and ip.version == 4)
                or str(ip) in bound)

    addresses: list[IPAddress] = []
    interfaces: list[IPAddress] = []
    for adapter in adapters:
        ips = [i.ip for i in _adapter_ips(adapter) if _reachable(i.ip)]
        ipv4 = [ip for ip in ips if ip.version == 4]
        chosen = [ip for ip in ips if wanted(ip)]
        if chosen and ipv4:
            addresses += chosen
            interfaces += ipv4
    if not addresses:
        return None
    return Announcement(port, _sorted(addresses), _sorted(interfaces))


def _bound_addresses(listen: str) -> list[str]:
    """The addresses ``api.listen`` binds: its host, or what its name resolves to."""
    host = listen_host(listen)
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return [str(info[4][0]) for info in found]


def _scan(listen: str, port: int) -> Announcement | None:
    """`plan_announcement` on this machine now (blocking: a name lookup, getifaddrs)."""
    return plan_announcement(_bound_addresses(listen), port, ifaddr.get_adapters())


def _dns_label(text: str) -> str:
    """``text`` as a host name label: lower case letters, digits and dashes."""
    label = "".join(c if c.isascii() and c.isalnum() else "-" for c in text.lower())
    return label.strip("-") or "device"


def service_info(device_id: str, announcement: Announcement, version: str) -> ServiceInfo:
    """The DNS-SD records of one device (its host name is ``edge-agent-<id>.local``,
    never the machine's own, which avahi may already hold)."""
    return ServiceInfo(
        SERVICE_TYPE, f"{device_id[:63]}.{SERVICE_TYPE}", port=announcement.port,
        properties={"txtvers": "1", "id": device_id, "version": version, "path": API_PATH},
        server=f"edge-agent-{_dns_label(device_id)[:52]}.local.",
        parsed_addresses=list(announcement.addresses),
    )


# ----------------------------------------------------------------------------
# Finding devices


class Device(msgspec.Struct, frozen=True):
    """One device that answered, as `edge-agent discover` shows it."""

    device: str  # the device id (TXT ``id``)
    url: str  # where its API and page start
    address: str  # HOST:PORT of the API: the address this machine reaches directly
    addresses: list[str]
    port: int
    version: str
    name: str  # the DNS-SD instance (another device with the same id gets "-2")
    host: str  # its mDNS host name


def device_from_info(info: ServiceInfo,
                     local: Collection[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
                     ) -> Device | None:
    """The `Device` a resolved service stands for; None without an address or port.

    A device announces every address it has, on every interface; the one shown
    first (and in the URL) is on one of the ``local`` networks where there is one,
    so it is an address this machine reaches directly.
    """
    def preference(ip: IPAddress) -> tuple[bool, bool, int, IPAddress]:
        return not any(ip in net for net in local), *_preference(ip)

    ips = sorted({ipaddress.ip_address(a) for a in info.parsed_addresses()}, key=preference)
    if not ips or not info.port:
        return None
    props = {key.decode("utf-8", "replace"): value.decode("utf-8", "replace")
             for key, value in info.properties.items() if value is not None}
    first = ips[0]
    address = f"[{first}]:{info.port}" if first.version == 6 else f"{first}:{info.port}"
    path = props.get("path") or API_PATH
    instance = info.name.removesuffix("." + SERVICE_TYPE)
    return Device(
        device=props.get("id") or instance, url=f"http://{address}/{path.lstrip('/')}",
        address=address, addresses=[str(ip) for ip in ips], port=info.port,
        version=props.get("version") or "unknown", name=instance,
        host=(info.server or "").rstrip("."),
    )


def _open() -> Zeroconf:
    try:
        return Zeroconf(interfaces=InterfaceChoice.All)
    except RuntimeError:  # zeroconf's "No interfaces to listen on"
        raise DiscoveryError("no network interface with an IPv4 address to ask on "
                             "(is the network up?)") from None
    except OSError as exc:
        raise DiscoveryError(f"cannot open the mDNS socket (UDP port 5353): "
                             f"{exc.strerror or exc}") from None


def browse(seconds: float) -> list[Device]:
    """The devices that answer within ``seconds``, by device id (blocking: for the
    command line, not the agent).

    Questions go out as multicast (QM), so the answers are multicast too: on a
    machine where several mDNS stacks share port 5353 (an agent, avahi), a unicast
    answer could reach one of the others instead.

    Raises:
        DiscoveryError: mDNS cannot be used on this machine now.
    """
    zc = _open()
    try:
        names: set[str] = set()
        lock = threading.Lock()

        def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                      state_change: ServiceStateChange) -> None:
            with lock:
                if state_change is ServiceStateChange.Removed:
                    names.discard(name)
                else:
                    names.add(name)

        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change],
                                 question_type=DNSQuestionType.QM)
        try:
            time.sleep(seconds)
        finally:
            browser.cancel()
        with lock:
            answered = sorted(names)
        local = {i.network for adapter in ifaddr.get_adapters() for i in _adapter_ips(adapter)}
        found: list[Device] = []
        for name in answered:  # answers carry every record: mostly read from the cache
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=_RESOLVE_MS,
                                       question_type=DNSQuestionType.QM)
            device = device_from_info(info, local) if info is not None else None
            if device is not None:
                found.append(device)
        return sorted(found, key=lambda d: (d.device, d.address))
    finally:
        zc.close()


# ----------------------------------------------------------------------------
# The agent's announcement


@dataclass
class AdvertiseStats:
    """The announcement, as ``/v1/status`` shows it under ``discovery``."""

    state: AdvertiseState = "waiting"
    detail: str = ""
    name: str | None = None  # the instance announced
    addresses: list[str] = field(default_factory=list)
    port: int | None = None
    registrations: int = 0
    failures: int = 0


class Advertiser:
    """Announces the device API on the local network while `run` runs.

    The agent adds `run` as a supervised task after the API, and only when the API
    listens beyond loopback. Network trouble never fails the task: it is logged,
    shown in `stats`, and tried again at the next refresh.

    Args:
        config: the ``[api]`` section (``listen``, ``advertise``).
        device_id: named in the instance and the TXT record.
        api_url: the API's bound base URL, None while it does not serve.
        runner: worker threads for zeroconf's blocking calls.
        refresh_seconds: how often the machine's addresses are read again.
    """

    def __init__(self, config: ApiConfig, *, device_id: str,
                 api_url: Callable[[], str | None], runner: ThreadRunner | None = None,
                 refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.config = config
        self.device_id = device_id
        self.stats = AdvertiseStats()
        self.refresh_seconds = refresh_seconds
        self._api_url = api_url
        # Two threads: a shutdown's goodbye must not queue behind a registration.
        self._runner = runner or ThreadRunner(2)
        self._zc: Zeroconf | None = None
        self._announced: Announcement | None = None
        self._wake = trio.Event()

    def reconfigure(self, new: ApiConfig) -> None:
        """Apply a reloaded ``[api]`` section: ``advertise`` takes effect at once.
        ``listen`` stays as it was: the API's socket stays bound there until a restart."""
        self.config = msgspec.structs.replace(new, listen=self.config.listen)
        self._wake.set()

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the announcement in step with the config and the network until
        cancelled; then say goodbye, so browsers drop the device at once."""
        task_status.started()
        try:
            while True:
                self._wake = trio.Event()
                await self._update()
                with trio.move_on_after(self.refresh_seconds):
                    await self._wake.wait()
        finally:
            with trio.move_on_after(_CLOSE_SECONDS, shield=True):
                await self._withdraw()

    async def _update(self) -> None:
        if not self.config.advertise:
            await self._withdraw()
            self._show("off", "api.advertise = false")
            return
        url = self._api_url()
        port = urlsplit(url).port if url else None
        if port is None:
            await self._withdraw()
            self._show("waiting", "the API is not serving")
            return
        try:
            wanted = await self._runner.run(_scan, self.config.listen, port)
            if wanted == self._announced and wanted is not None:
                return
            if self._announced is not None and wanted is not None:
                log.info("network addresses changed: announcing again old=%s new=%s",
                         ",".join(self._announced.addresses), ",".join(wanted.addresses))
            await self._withdraw()
            if wanted is None:
                self._show("waiting", f"no address beyond loopback for api.listen "
                                      f"{self.config.listen} (network not up yet?)")
                return
            await self._register(wanted)
        except _NETWORK_ERRORS as exc:
            self.stats.failures += 1
            await self._withdraw()
            self._show("failing", f"{type(exc).__name__}: {exc}")

    async def _register(self, wanted: Announcement) -> None:
        with trio.CancelScope(shield=True):  # quick (no network wait), and never lost
            zc = await self._runner.run(partial(Zeroconf, interfaces=list(wanted.interfaces)))
        self._zc = zc
        info = service_info(self.device_id, wanted, agent_version())
        asked = info.name
        await self._runner.run_abandonable(partial(zc.register_service, info,
                                                   allow_name_change=True))
        self._announced = wanted
        st = self.stats
        st.registrations += 1
        st.name, st.addresses, st.port = info.name, list(wanted.addresses), wanted.port
        if info.name != asked:
            log.warning("another device on the network announces device id %s; this one is "
                        "announced as name=%r", self.device_id, info.name)
        self._show("advertising", f"{len(wanted.addresses)} address(es)")
        log.info("advertising on the network name=%r addresses=%s port=%d", info.name,
                 ",".join(wanted.addresses), wanted.port)

    async def _withdraw(self) -> None:
        """Close the announcement in place, if any (the goodbye is best effort)."""
        zc, self._zc = self._zc, None
        was, self._announced = self._announced, None
        st = self.stats
        st.name, st.addresses, st.port = None, [], None
        if zc is None:
            return
        try:
            await self._runner.run_abandonable(zc.close)
        except _NETWORK_ERRORS as exc:
            log.warning("mdns goodbye failed error=%r", exc)
        if was is not None:
            log.info("stopped advertising on the network")

    def _show(self, state: AdvertiseState, detail: str) -> None:
        """Record the state; log it when it changes."""
        st = self.stats
        if (st.state, st.detail) == (state, detail):
            return
        st.state, st.detail = state, detail
        if state == "failing":
            log.warning("cannot advertise on the network reason=%r (tried again in %gs)",
                        detail, self.refresh_seconds)
        elif state != "advertising":
            log.info("not advertising on the network reason=%r", detail)
