"""Network egress grants: what a task may reach, as an allow-list.

A grant is ``HOST:PORT`` (one host name), ``*.DOMAIN:PORT`` (any name below ``DOMAIN``),
or ``ADDRESS:PORT`` / ``CIDR:PORT`` (addresses; IPv6 in brackets: ``[2001:db8::/32]:443``).
A name is granted by name only: an IP literal is reached only where an address grant covers
it. A granted name must also resolve to public addresses, unless an address grant names the
range it resolves to (so a name cannot be pointed at loopback, a private network or a cloud
metadata service after it was granted).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The most grants one list holds.
MAX_GRANTS = 64
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class Grant:
    """One allowed destination: a name, every name below a domain, or a network; a port."""

    port: int
    #: A host name (lower case, no trailing dot), or for a wildcard the domain below which
    #: every name is granted.
    name: str | None = None
    wildcard: bool = False
    network: IPNetwork | None = None

    def __str__(self) -> str:
        if self.network is not None:
            if self.network.version == 6:
                return f"[{self.network}]:{self.port}"
            return f"{self.network}:{self.port}"
        return f"{'*.' if self.wildcard else ''}{self.name}:{self.port}"

    def covers_name(self, host: str, port: int) -> bool:
        if port != self.port or self.name is None:
            return False
        if self.wildcard:
            return host.endswith("." + self.name)
        return host == self.name

    def covers_address(self, address: IPAddress, port: int) -> bool:
        return port == self.port and self.network is not None and address in self.network

    def within(self, other: Grant) -> bool:
        """Whether everything this grant allows, ``other`` allows too."""
        if self.port != other.port:
            return False
        if self.network is not None:
            return (
                other.network is not None
                and self.network.version == other.network.version
                and self.network.subnet_of(other.network)  # type: ignore[arg-type]
            )
        assert self.name is not None
        if other.name is None:
            return False
        if other.wildcard:
            return self.name.endswith("." + other.name) or (
                self.wildcard and self.name == other.name
            )
        return not self.wildcard and self.name == other.name


def parse_grant(text: str) -> Grant:
    """A grant from its text; ``ValueError`` saying what is wrong."""
    if not isinstance(text, str) or not text or len(text) > 300:
        raise ValueError("a grant is HOST:PORT, *.DOMAIN:PORT or CIDR:PORT")
    host, colon, port_text = text.strip().rpartition(":")
    if not colon or not host:
        raise ValueError(f"{text!r}: give a port (HOST:PORT)")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port is a number from 1 to 65535")
    port = int(port_text)
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{text!r}: an IPv6 address or network goes in brackets")
        return Grant(port, network=_network(host[1:-1], text, version=6))
    if _looks_numeric(host):
        return Grant(port, network=_network(host, text, version=4))
    if ":" in host:
        raise ValueError(
            f"{text!r}: an IPv6 address or network goes in brackets: [2001:db8::1]:443"
        )
    wildcard = host.startswith("*.")
    name = host.removeprefix("*.").lower().removesuffix(".")
    labels = name.split(".")
    if (
        not name
        or len(name) > 253
        or "*" in name
        or not all(_LABEL.fullmatch(label) for label in labels)
        or (wildcard and len(labels) < 2)
    ):
        raise ValueError(
            f"{text!r}: not a host name (letters, digits and hyphens; a wildcard only as the "
            "first label of a domain of two labels or more, as in *.example.org)"
        )
    return Grant(port, name=name, wildcard=wildcard)


def _looks_numeric(host: str) -> bool:
    return all(char.isdigit() or char in "./" for char in host)


def _network(text: str, whole: str, *, version: int) -> IPNetwork:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"{whole!r}: not an address or network: {exc}") from None
    if network.version != version:
        raise ValueError(f"{whole!r}: IPv6 goes in brackets, IPv4 does not")
    return network


def parse_grants(texts: tuple[str, ...] | list[str]) -> tuple[Grant, ...]:
    """Grants from their texts, in order, without repeats; ``ValueError`` naming the first
    bad one by its index (``allow[3]: ...``)."""
    if len(texts) > MAX_GRANTS:
        raise ValueError(f"at most {MAX_GRANTS} grants")
    grants: list[Grant] = []
    for index, text in enumerate(texts):
        try:
            grant = parse_grant(text)
        except ValueError as exc:
            raise ValueError(f"allow[{index}]: {exc}") from None
        if grant not in grants:
            grants.append(grant)
    return tuple(grants)


@dataclass(frozen=True)
class AllowList:
    """The grants of one task: what its proxy lets through."""

    grants: tuple[Grant, ...]

    @classmethod
    def parse(cls, texts: tuple[str, ...] | list[str]) -> AllowList:
        return cls(parse_grants(texts))

    def name_allowed(self, host: str, port: int) -> bool:
        """Whether the host name ``host`` (lower case) is granted at ``port``."""
        return any(grant.covers_name(host, port) for grant in self.grants)

    def address_allowed(self, address: IPAddress, port: int, *, by_name: bool) -> bool:
        """Whether a connection to ``address`` may be made: an address grant covers it, or
        (``by_name``: it is what a granted name resolved to) it is a public address."""
        if any(grant.covers_address(address, port) for grant in self.grants):
            return True
        return by_name and is_public(address)

    def within(self, cap: AllowList) -> bool:
        """Whether every grant here is one that ``cap`` allows too (a task may only narrow
        what the operator allows)."""
        return all(any(grant.within(top) for top in cap.grants) for grant in self.grants)

    def outside(self, cap: AllowList) -> list[Grant]:
        """The grants here that ``cap`` does not allow."""
        return [grant for grant in self.grants if not any(grant.within(top) for top in cap.grants)]


def is_public(address: IPAddress) -> bool:
    """A globally routable unicast address: not loopback, private, link-local (cloud metadata
    services live there), shared, reserved, multicast or unspecified; an IPv4-mapped IPv6
    address is judged as the IPv4 address it maps."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast
