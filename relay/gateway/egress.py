"""Where the gateway itself may connect to (egress), and how those URLs are logged.

The gateway opens connections of its own for external services (``service_type:
external``) and webhooks, to URLs a team's sk- key chose. Without a rule that is a
server-side request forgery: a URL aimed at ``127.0.0.1:<another team's hub port>``, at
the gateway's own port, or at a cloud metadata address (``169.254.169.254``) would make
the gateway fetch what the caller cannot reach and hand it back.

The rule (:class:`EgressPolicy`):

* By default only *global* addresses are reached: loopback, link-local, private
  (RFC 1918, ULA), shared (100.64/10), unspecified, reserved, documentation and
  multicast addresses are refused (IPv4-mapped IPv6 addresses count as their IPv4
  address). ``relay gateway --allow-private-egress`` (``RELAY_ALLOW_PRIVATE_EGRESS``,
  ``allow_private_egress = true`` in ``[gateway]``) allows them, for a gateway whose
  teams run their services on the local network (GitLab's "allow requests to the local
  network").
* Never, whatever the option, the gateway's own listening port and hub ports on any
  address of its own host (a loop, and a way around the hub ports' per-tunnel scope).
* Checked when connecting, on the addresses the name resolves to: every address is
  checked and the connection is made to a checked address, never by resolving the name
  again (a DNS answer cannot change between the check and the connect). A URL with a
  literal forbidden address is refused already when it is registered (400
  ``egress_not_allowed``). Redirects are never followed (webhooks read the status only;
  the proxy passes a 3xx to its client), so a redirect cannot lead anywhere unchecked.

:func:`redact_url` is how such a URL appears in logs: ``scheme://host[:port]`` only,
since the path and query of a webhook URL (Slack, Discord) are its secret.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union
from urllib.parse import urlsplit

__all__ = ["EgressPolicy", "EgressRefused", "is_ip_literal", "redact_url"]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class EgressRefused(ConnectionRefusedError):
    """The policy refuses this destination. A ConnectionRefusedError, so every caller's
    "cannot connect" path (502 for a service, a failed webhook attempt) handles it."""


def redact_url(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: no userinfo, path, query or fragment."""
    try:
        split = urlsplit(url)
        host = split.hostname or ""
        port = split.port
    except ValueError:
        return "<malformed url>"
    host = f"[{host}]" if ":" in host else host
    return f"{split.scheme}://{host}" + (f":{port}" if port else "")


def is_ip_literal(host: str) -> bool:
    """Is ``host`` an IP address or a ``localhost`` name (judged without DNS)?"""
    return _literal(host) is not None


def _literal(host: str) -> Optional[IPAddress]:
    """The address ``host`` names without DNS: an IP literal (brackets allowed), or
    loopback for ``localhost`` names (RFC 6761); None for any other name."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        host = "127.0.0.1"
    return _address(host)


def _address(text: str) -> Optional[IPAddress]:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # a v6 zone id is not part of it
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address to a network that may route it there:
        # judged as that IPv4 address (a NAT64 gateway turns 64:ff9b::a9fe:a9fe into
        # 169.254.169.254).
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
    return ip


#: The NAT64 well-known prefix (RFC 6052).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_private(ip: IPAddress) -> bool:
    """Not a global unicast address (see the module docstring)."""
    return not ip.is_global or ip.is_multicast


def _local_addresses() -> set[IPAddress]:
    """Addresses of this host's name (the interfaces the OS lists for it)."""
    found: set[IPAddress] = set()
    try:
        for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM):
            ip = _address(str(sockaddr[0]))
            if ip is not None:
                found.add(ip)
    except OSError:
        pass
    return found


class EgressPolicy:
    """Which addresses the gateway connects to (module docstring).

    ``own_ports()`` gives the gateway's listening and hub ports right now; ``own_hosts``
    are the addresses it listens on (unspecified ones mean all of this host's)."""

    def __init__(self, allow_private: bool = False, *,
                 own_ports: Callable[[], Iterable[int]] = lambda: (),
                 own_hosts: Iterable[str] = ()) -> None:
        self.allow_private = allow_private
        self._own_ports = own_ports
        self._own_hosts: set[IPAddress] = {ip for ip in map(_address, own_hosts) if ip is not None}
        self._own_hosts |= _local_addresses()

    def add_own_host(self, host: str) -> None:
        """Another address the gateway listens on (known once it started)."""
        ip = _address(host)
        if ip is not None:
            self._own_hosts.add(ip)

    def refusal(self, ip: IPAddress, port: int) -> Optional[str]:
        """Why ``ip:port`` may not be reached, or None."""
        if (is_private(ip) or ip in self._own_hosts) and port in set(self._own_ports()):
            return f"{ip} port {port} is this gateway's own port"
        if is_private(ip) and not self.allow_private:
            return (f"{ip} is a loopback, link-local or private address; the gateway connects "
                    f"to those only when started with --allow-private-egress")
        return None

    def is_gateway(self, host: str, port: int, *, from_this_host: bool,
                   future_ports: Iterable[int] = ()) -> bool:
        """Would a connection to ``host:port`` reach this gateway's own listening or hub
        port (or one of ``future_ports``, about to listen)? ``from_this_host``: the
        connection is made on the gateway's host (an agent running there), where loopback
        and unspecified addresses are the gateway's too. Only literal addresses and
        ``localhost`` names are judged (no DNS)."""
        if port not in set(self._own_ports()) and port not in set(future_ports):
            return False
        ip = _literal(host)
        if ip is None:
            return False
        if ip.is_loopback or ip.is_unspecified:
            return from_this_host
        return ip in self._own_hosts

    def own_ports(self) -> list[int]:
        """The gateway's listening and hub ports, now."""
        return list(self._own_ports())

    def is_own_port(self, port: int) -> bool:
        """Is ``port`` one of the gateway's listening and hub ports now? (Without a copy
        of them: asked on every hub connection.)"""
        return port in self._own_ports()

    def is_own_host(self, host: str) -> bool:
        """Is ``host`` (an address, e.g. an agent's peer address) this gateway's host?"""
        ip = _address(host)
        return ip is not None and (ip.is_loopback or ip in self._own_hosts)

    def check_url(self, url: str) -> Optional[str]:
        """At registration: why ``url`` (http/https) can never be reached, judged from
        what it says without resolving a name (``localhost`` names count as loopback)."""
        split = urlsplit(url)
        port = split.port or (443 if split.scheme == "https" else 80)
        ip = _literal(split.hostname or "")
        return None if ip is None else self.refusal(ip, port)

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` that may be reached; EgressRefused if none may."""
        literal = _address(host)
        if literal is not None:
            candidates = [str(literal)]
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            candidates = list(dict.fromkeys(str(info[4][0]) for info in infos))
        allowed, reasons = [], []
        for text in candidates:
            ip = _address(text)
            reason = "not an IP address" if ip is None else self.refusal(ip, port)
            if reason is None:
                allowed.append(str(ip))
            else:
                reasons.append(reason)
        if not allowed:
            raise EgressRefused(f"egress to {host}:{port} refused: {'; '.join(reasons) or 'no address'}")
        return allowed

    async def open_connection(self, host: str, port: int, *, ssl_context: Optional[ssl.SSLContext] = None,
                              **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """``asyncio.open_connection`` to ``host:port`` through the policy: to the first
        allowed address that answers (TLS verified against ``host``, the name)."""
        error: Optional[OSError] = None
        for address in await self.resolve(host, port):
            try:
                return await asyncio.open_connection(
                    address, port, ssl=ssl_context, server_hostname=host if ssl_context else None,
                    **kwargs)
            except OSError as exc:
                error = exc
        assert error is not None
        raise error
