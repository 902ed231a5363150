"""The egress proxy: the only way out of a task granted a network, one proxy per task.

A task reaches it as ``HTTP_PROXY``/``HTTPS_PROXY``. It takes ``CONNECT host:port`` (for TLS
and any TCP protocol) and absolute-form plain HTTP (``GET http://host/path``), and lets a
request through only if the task's ``AllowList`` grants it:

- a host name must be granted by name; an IP literal only by an address grant;
- the proxy resolves the name itself (the task has no DNS) and connects to an address it
  checked: a public one, or one an address grant names (a name pointed at loopback, a
  private network or a metadata service after it was granted is refused);
- the ``Host`` header must name the target, and after a ``CONNECT`` the TLS ClientHello's
  SNI must too (no fronting another name on a granted host's address);
- a connection cap and a byte cap hold for the task's whole run.

Every connection, allowed or refused, is logged with host, port, address, bytes and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from parity_sandbox._egress import AllowList, IPAddress

#: The largest request head (request line and headers) the proxy reads.
MAX_HEAD = 16 * 1024
#: Seconds a client has to send its request head, and the first bytes after a CONNECT.
HEAD_TIMEOUT = 10.0
#: Seconds to connect to the destination.
CONNECT_TIMEOUT = 10.0
_CHUNK = 64 * 1024
#: Headers meant for the proxy, never passed on.
_HOP_HEADERS = frozenset(
    {"proxy-connection", "proxy-authorization", "connection", "keep-alive", "te", "upgrade"}
)


@dataclass
class Connection:
    """One connection a task asked for, as the proxy handled it."""

    host: str
    port: int
    allowed: bool
    #: Why it was refused or cut short (``None``: it ran to its end).
    reason: str | None = None
    #: The address connected to (an allowed connection).
    address: str | None = None
    sent: int = 0
    received: int = 0
    started: float = field(default_factory=time.time)
    ended: float | None = None


class Refused(Exception):
    """A request the allow-list (or a cap) does not let through."""


class EgressProxy:
    """An HTTP proxy that lets one task reach what its allow-list grants, and nothing else.

    Args:
        allow: the task's grants.
        max_connections: connections the task may open in all (refused beyond).
        max_bytes: bytes the task's connections may carry in all, both ways (cut beyond).
        source: the local address to connect from (the proxy's own interface), if any.
    """

    def __init__(
        self,
        allow: AllowList,
        *,
        max_connections: int = 256,
        max_bytes: int = 1 << 30,
        source: str | None = None,
    ) -> None:
        self.allow = allow
        self.max_connections = max_connections
        self.max_bytes = max_bytes
        self.source = source
        self.log: list[Connection] = []
        self._bytes = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on ``host:port``; the port it listens on."""
        self._server = await asyncio.start_server(self._client, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        if self._server is not None:
            self._server.close()
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._handlers.discard(handler)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return await _answer(writer, 431, "the request head is too large")
        if len(head) > MAX_HEAD:
            return await _answer(writer, 431, "the request head is too large")
        try:
            method, target, headers = _parse_head(head)
        except ValueError as exc:
            return await _answer(writer, 400, str(exc))
        connect = method == "CONNECT"
        try:
            host, port = _target(method, target)
        except ValueError as exc:
            return await _answer(writer, 400, str(exc))
        entry = Connection(host, port, allowed=False)
        self.log.append(entry)
        try:
            named = headers.get("host")
            if named is not None and not _same_authority(named, host, port, connect):
                raise Refused(f"the Host header names {named[:100]!r}, not {host}:{port}")
            if len(self.log) > self.max_connections:
                raise Refused(f"the task may open {self.max_connections} connections")
            address = await self._check(host, port)
            upstream_reader, upstream_writer = await self._open(address, port)
        except Refused as exc:
            entry.reason = str(exc)
            entry.ended = time.time()
            return await _answer(writer, 403, entry.reason)
        except OSError as exc:
            entry.reason = f"cannot connect: {exc.strerror or exc}"
            entry.ended = time.time()
            return await _answer(writer, 502, entry.reason)
        entry.allowed, entry.address = True, str(address)
        try:
            if connect:
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                await writer.drain()
                first = await self._first_bytes(reader)
                problem = _inner_problem(first, host)
                if problem is not None:
                    entry.allowed, entry.reason = False, problem
                    return None
            else:
                first = _origin_form(head, target)
            await self._relay(entry, first, reader, writer, upstream_reader, upstream_writer)
        finally:
            upstream_writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await upstream_writer.wait_closed()
            entry.ended = time.time()

    async def _check(self, host: str, port: int) -> IPAddress:
        """The address to connect to for ``host:port``, or ``Refused``."""
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            if not self.allow.address_allowed(literal, port, by_name=False):
                raise Refused(f"{host}:{port} is not granted (an address needs an address grant)")
            return literal
        if not self.allow.name_allowed(host, port):
            raise Refused(f"{host}:{port} is not granted")
        try:
            found = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError) as exc:
            raise Refused(f"{host} does not resolve: {exc}") from None
        addresses: list[IPAddress] = []
        for *_, sockaddr in found:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if not self.allow.address_allowed(address, port, by_name=True):
                # Every address it resolves to must pass: a name that resolves partly to a
                # private address is refused, whichever of them a client would pick.
                raise Refused(
                    f"{host} resolves to {address}, which is not a public address and no "
                    "address grant names it"
                )
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise Refused(f"{host} resolves to no address")
        return addresses[0]

    async def _open(
        self, address: IPAddress, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        local = (self.source, 0) if self.source else None
        async with asyncio.timeout(CONNECT_TIMEOUT):
            return await asyncio.open_connection(str(address), port, local_addr=local)

    async def _first_bytes(self, reader: asyncio.StreamReader) -> bytes:
        """What the client sends first after a ``CONNECT``: a whole TLS record when it starts
        one (the ClientHello, whose SNI is checked), else what came."""
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError):
            async with asyncio.timeout(HEAD_TIMEOUT):
                first = await reader.read(_CHUNK)
                if first[:1] == b"\x16":
                    while len(first) < 5:
                        first += await reader.readexactly(5 - len(first))
                    size = 5 + int.from_bytes(first[3:5], "big")
                    if len(first) < size <= MAX_HEAD:
                        first += await reader.readexactly(size - len(first))
                return first
        return b""

    async def _relay(
        self,
        entry: Connection,
        first: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> None:
        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, outward: bool
        ) -> None:
            while True:
                data = await source.read(_CHUNK)
                if not data:
                    if sink.can_write_eof():
                        with contextlib.suppress(OSError):
                            sink.write_eof()
                    return
                left = self.max_bytes - self._bytes
                over = len(data) > left
                data = data[: max(left, 0)]  # up to the cap, then the connection is cut
                self._bytes += len(data)
                if outward:
                    entry.sent += len(data)
                else:
                    entry.received += len(data)
                if data:
                    sink.write(data)
                    await sink.drain()
                if over:
                    entry.reason = f"the task's connections may carry {self.max_bytes} bytes"
                    raise Refused(entry.reason)

        if first:
            self._bytes += len(first)
            entry.sent += len(first)
            upstream_writer.write(first)
            await upstream_writer.drain()
        pumps = [
            asyncio.create_task(pump(reader, upstream_writer, True)),
            asyncio.create_task(pump(upstream_reader, writer, False)),
        ]
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            for finished in done:
                if isinstance(finished.exception(), Refused):
                    return  # the cap: both ways are cut
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for running in pumps:
                running.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    body = f"parity-sandbox egress proxy: {reason}\n".encode()
    phrase = {400: "Bad Request", 403: "Forbidden", 431: "Too Large", 502: "Bad Gateway"}
    writer.write(
        f"HTTP/1.1 {status} {phrase.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, target and headers (lower-case names) of a request head."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("the request head is not ASCII") from None
    line, *lines = text.split("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("not an HTTP/1.x request")
    headers: dict[str, str] = {}
    for header in lines:
        if not header:
            continue
        name, colon, value = header.partition(":")
        if not colon or not name or name != name.strip():
            raise ValueError("a malformed header")
        if name.lower() in headers and name.lower() == "host":
            raise ValueError("two Host headers")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], headers


def _target(method: str, target: str) -> tuple[str, int]:
    """The host (lower case, no brackets) and port a request goes to."""
    if method == "CONNECT":
        host, port = _authority(target)
        if port is None:
            raise ValueError("CONNECT takes host:port")
        return host, port
    parts = urlsplit(target)
    if parts.scheme != "http" or not parts.netloc:
        raise ValueError("a proxy request names an http:// URL (https goes through CONNECT)")
    if "@" in parts.netloc:
        raise ValueError("no credentials in the URL")
    host, port = _authority(parts.netloc)
    return host, port or 80


def _authority(text: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) as host and port."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"a bad authority {text[:100]!r}")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_found = text.rpartition(":")
        if not colon:
            host, port_text = text, None
        else:
            port_text = port_text_found
    if not host or any(char in host for char in "/?#@ \t"):
        raise ValueError(f"a bad authority {text[:100]!r}")
    if port_text is None:
        return host.lower().removesuffix("."), None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"a bad port in {text[:100]!r}")
    return host.lower().removesuffix("."), int(port_text)


def _same_authority(named: str, host: str, port: int, connect: bool) -> bool:
    """Whether a ``Host`` header names ``host:port`` (without a port: the default one, or for
    a ``CONNECT`` any)."""
    try:
        named_host, named_port = _authority(named)
    except ValueError:
        return False
    if named_host != host:
        return False
    if named_port is None:
        return connect or port == 80
    return named_port == port


def _origin_form(head: bytes, target: str) -> bytes:
    """A plain HTTP request head rewritten for the origin: its path instead of the whole URL,
    without the headers meant for the proxy, and closing after one response (a client that
    kept the connection could send its next request elsewhere)."""
    parts = urlsplit(target)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    line, *lines = head.decode("ascii").split("\r\n")
    method, _, version = line.split(" ")
    kept = [
        header
        for header in lines
        if header and header.partition(":")[0].strip().lower() not in _HOP_HEADERS
    ]
    return "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""]).encode(
        "ascii"
    )


def _inner_problem(first: bytes, host: str) -> str | None:
    """Why what the client sent first after ``CONNECT host:...`` may not go on: a TLS
    ClientHello whose SNI names another host, or an HTTP request whose Host header does."""
    if first[:1] == b"\x16":  # a TLS handshake record
        sni = client_hello_sni(first)
        if sni is None:
            return None if _is_ip(host) else "a TLS ClientHello without SNI to a host name"
        if sni.lower().removesuffix(".") != host:
            return f"the TLS SNI names {sni[:100]!r}, not {host}"
        return None
    if first[:1].isalpha():  # perhaps an HTTP request inside the tunnel
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            head = first.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            *_, headers = _parse_head(head)
            named = headers.get("host")
            if named is not None and _authority(named)[0] != host:
                return f"the Host header names {named[:100]!r}, not {host}"
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def client_hello_sni(record: bytes) -> str | None:
    """The server name a TLS ClientHello asks for (``None``: none, or not a ClientHello the
    first record holds whole)."""
    try:
        if record[0] != 0x16 or record[5] != 0x01:  # handshake record, ClientHello
            return None
        position = 5 + 4 + 2 + 32  # record header, handshake header, version, random
        position += 1 + record[position]  # session id
        position += 2 + int.from_bytes(record[position : position + 2], "big")  # ciphers
        position += 1 + record[position]  # compression methods
        end = position + 2 + int.from_bytes(record[position : position + 2], "big")
        position += 2
        while position + 4 <= end:
            kind = int.from_bytes(record[position : position + 2], "big")
            size = int.from_bytes(record[position + 2 : position + 4], "big")
            body = record[position + 4 : position + 4 + size]
            if kind == 0:  # server_name: list length, then (type 0, length, name)
                if len(body) >= 5 and body[2] == 0:
                    length = int.from_bytes(body[3:5], "big")
                    return body[5 : 5 + length].decode("ascii")
                return None
            position += 4 + size
    except (IndexError, UnicodeDecodeError):
        return None
    return None
