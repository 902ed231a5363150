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

import contextlib
import fcntl
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from parity_sandbox._egress import AllowList, IPAddress

#: The largest request head (request line and headers) the proxy reads.
MAX_HEAD = 16 * 1024
#: Seconds a client has to send its request head, and the first bytes after a CONNECT.
HEAD_TIMEOUT = 10.0
#: Seconds to connect to the destination.
CONNECT_TIMEOUT = 10.0
#: Bytes read at a time, and buffered per direction: large, for a fast download.
_CHUNK = 1 << 20
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

    A thread accepts connections and a thread serves each; an allowed connection's bytes move
    between the two sockets by ``splice`` (through a pipe, never through Python), one thread
    per direction.

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
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def start(self, host: str, port: int = 0) -> int:
        """Listen on ``host:port``; the port it listens on."""
        self._listener = socket.create_server((host, port), backlog=128)
        self._spawn(self._accept, self._listener)
        return int(self._listener.getsockname()[1])

    def close(self) -> None:
        """Stop listening and cut every connection; returns once every thread has ended."""
        with self._lock:
            self._closed = True
            cut = [*self._sockets, *([self._listener] if self._listener else [])]
        for sock in cut:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in list(self._threads):
            thread.join(CONNECT_TIMEOUT + HEAD_TIMEOUT)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name="parity-sandbox-egress-proxy", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> bool:
        """Count ``sock`` among the open ones (``False``: the proxy closes; it was closed)."""
        with self._lock:
            if self._closed:
                sock.close()
                return False
            self._sockets.add(sock)
            return True

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            if self._track(client):
                self._spawn(self._client, client)

    def _client(self, client: socket.socket) -> None:
        try:
            self._serve(client)
        except (OSError, ValueError):
            pass
        finally:
            self._untrack(client)

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(HEAD_TIMEOUT)
        head, rest = _read_head(client)
        if head is None:
            return _answer(client, 431, "the request head is too large")
        try:
            method, target, headers = _parse_head(head)
            host, port = _target(method, target)
        except ValueError as exc:
            return _answer(client, 400, str(exc))
        connect = method == "CONNECT"
        entry = Connection(host, port, allowed=False)
        with self._lock:
            self.log.append(entry)
            count = len(self.log)
        try:
            named = headers.get("host")
            if named is not None and not _same_authority(named, host, port, connect):
                raise Refused(f"the Host header names {named[:100]!r}, not {host}:{port}")
            if count > self.max_connections:
                raise Refused(f"the task may open {self.max_connections} connections")
            address = self._check(host, port)
            source = (self.source, 0) if self.source else None
            upstream = socket.create_connection(
                (str(address), port), timeout=CONNECT_TIMEOUT, source_address=source
            )
        except Refused as exc:
            entry.reason, entry.ended = str(exc), time.time()
            return _answer(client, 403, entry.reason)
        except OSError as exc:
            entry.reason = f"cannot connect: {exc.strerror or exc}"
            entry.ended = time.time()
            return _answer(client, 502, entry.reason)
        if not self._track(upstream):
            return None
        entry.allowed, entry.address = True, str(address)
        try:
            if connect:
                client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                first = rest + _first_bytes(client, rest)
                problem = _inner_problem(first, host)
                if problem is not None:
                    entry.allowed, entry.reason = False, problem
                    return None
            else:
                first = _origin_form(head, target) + rest
            if not self._take(entry, len(first), outward=True):
                return None
            upstream.sendall(first)
            client.settimeout(None)
            upstream.settimeout(None)
            inward = threading.Thread(
                target=self._pump, args=(upstream, client, entry, False), daemon=True
            )
            inward.start()
            self._pump(client, upstream, entry, True)
            inward.join()
        finally:
            entry.ended = time.time()
            self._untrack(upstream)

    def _take(self, entry: Connection, size: int, *, outward: bool) -> bool:
        """Count ``size`` bytes against the cap; ``False`` (the connection is cut) past it."""
        with self._lock:
            if self._bytes + size > self.max_bytes:
                entry.reason = f"the task's connections may carry {self.max_bytes} bytes"
                return False
            self._bytes += size
            if outward:
                entry.sent += size
            else:
                entry.received += size
            return True

    def _left(self) -> int:
        with self._lock:
            return self.max_bytes - self._bytes

    def _pump(
        self, source: socket.socket, sink: socket.socket, entry: Connection, outward: bool
    ) -> None:
        """Move bytes from ``source`` to ``sink`` until its end, the cap or the close."""
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError):  # a larger pipe moves more per call
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _CHUNK)
        try:
            while True:
                left = self._left()
                if left <= 0:
                    self._take(entry, 1, outward=outward)  # names the cap as the reason
                    break
                moved = os.splice(source.fileno(), write_end, min(_CHUNK, left))
                if moved == 0:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)  # pass the end on
                    return
                if not self._take(entry, moved, outward=outward):
                    break
                while moved:
                    moved -= os.splice(read_end, sink.fileno(), moved)
        except OSError:
            pass
        finally:
            os.close(read_end)
            os.close(write_end)
        # cut: both ways
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _check(self, host: str, port: int) -> IPAddress:
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
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
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


def _read_head(client: socket.socket) -> tuple[bytes | None, bytes]:
    """The request head (through its blank line; ``None``: over ``MAX_HEAD``) and what came
    after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            return None, b""
        chunk = client.recv(MAX_HEAD)
        if not chunk:
            raise ValueError("the client left before its request head ended")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _first_bytes(client: socket.socket, have: bytes) -> bytes:
    """More of what the client sends first after a ``CONNECT``: the rest of a TLS record it
    started (the ClientHello, whose SNI is checked), else what comes within the timeout."""
    data = b""
    with contextlib.suppress(TimeoutError, OSError):
        if not have:
            data = client.recv(_CHUNK)
        sofar = have + data
        if sofar[:1] == b"\x16":
            while len(sofar) < 5:
                more = client.recv(5 - len(sofar))
                if not more:
                    break
                data += more
                sofar += more
            size = 5 + int.from_bytes(sofar[3:5], "big")
            while len(sofar) < size <= MAX_HEAD:
                more = client.recv(size - len(sofar))
                if not more:
                    break
                data += more
                sofar += more
    return data


def _answer(client: socket.socket, status: int, reason: str) -> None:
    body = f"parity-sandbox egress proxy: {reason}\n".encode()
    phrase = {400: "Bad Request", 403: "Forbidden", 431: "Too Large", 502: "Bad Gateway"}
    with contextlib.suppress(OSError):
        client.sendall(
            f"HTTP/1.1 {status} {phrase.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )


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
