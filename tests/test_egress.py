"""Network egress grants (``Task.network``) and the egress proxy that enforces them.

The proxy runs for real on loopback, in front of stand-in origin servers on loopback; no test
sends a packet anywhere else (names that resolve elsewhere are only classified, never asked).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from conftest import TEST_IMAGE, WasmFixtures, containers_of, managed_containers
from parity_sandbox import (
    Config,
    DockerExecutor,
    ExecutionTimeout,
    InvalidInput,
    Task,
    WasmExecutor,
)
from parity_sandbox._egress import AllowList, is_public, parse_grant
from parity_sandbox._executor import spec_hash
from parity_sandbox._proxy import Connection, EgressProxy, client_hello_sni
from parity_sandbox.runtimes.docker import spec as docker_spec

# -- grants ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("Data.Example.org:443", "data.example.org:443"),
        ("data.example.org.:443", "data.example.org:443"),
        ("*.Example.net:8443", "*.example.net:8443"),
        ("203.0.113.0/24:80", "203.0.113.0/24:80"),
        ("203.0.113.5:80", "203.0.113.5/32:80"),
        ("[2001:db8::/32]:443", "[2001:db8::/32]:443"),
    ],
)
def test_a_grant_is_read_in_its_canonical_form(text: str, canonical: str) -> None:
    assert str(parse_grant(text)) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "",
        "example.org",  # no port
        "example.org:0",
        "example.org:65536",
        "example.org:-1",
        "example.org:\uff18\uff10",  # fullwidth digits: not ASCII
        "*.org:443",  # a wildcard over a whole top-level domain
        "*:443",
        "a.*.example.org:443",
        "exa mple.org:443",
        "-example.org:443",
        "ex_ample.org:443",
        "203.0.113.7/24:80",  # host bits set: ambiguous
        "2001:db8::1:443",  # IPv6 without brackets
        "[203.0.113.5]:80",  # IPv4 in brackets
        "[2001:db8::1:443",
        "a" * 64 + ".example.org:443",
        "x" * 400,
    ],
)
def test_a_malformed_grant_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_grant(text)
    with pytest.raises(InvalidInput) as caught:
        Task(image="busybox", network={"allow": ["ok.example.org:443", text]})
    assert caught.value.field is not None and caught.value.field.startswith("network")
    assert "allow[1]" in caught.value.message


def test_names_addresses_and_wildcards_grant_what_they_say() -> None:
    allow = AllowList.parse(["data.example.org:443", "*.example.net:443", "203.0.113.0/24:80"])
    assert allow.name_allowed("data.example.org", 443)
    assert not allow.name_allowed("data.example.org", 80)  # another port
    assert not allow.name_allowed("evil.data.example.org", 443)
    assert allow.name_allowed("a.example.net", 443) and allow.name_allowed("a.b.example.net", 443)
    assert not allow.name_allowed("example.net", 443)  # the wildcard is below the domain
    assert not allow.name_allowed("notexample.net", 443)
    on = ipaddress.ip_address("203.0.113.9")
    assert allow.address_allowed(on, 80, by_name=False)
    assert not allow.address_allowed(on, 443, by_name=False)
    # an IP literal needs an address grant, however public it is
    assert not allow.address_allowed(ipaddress.ip_address("198.51.100.1"), 443, by_name=False)
    # what a granted name resolves to must be public, unless an address grant names it
    assert allow.address_allowed(ipaddress.ip_address("198.51.100.1"), 443, by_name=True) is (
        is_public(ipaddress.ip_address("198.51.100.1"))
    )
    assert not allow.address_allowed(ipaddress.ip_address("10.1.2.3"), 443, by_name=True)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.231.0.5", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # shared address space
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:10.0.0.1", False),
    ],
)
def test_only_public_addresses_count_as_public(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


def test_a_task_may_only_narrow_what_the_operator_allows() -> None:
    cap = AllowList.parse(["*.example.org:443", "203.0.113.0/24:80", "api.example.com:443"])
    assert AllowList.parse(["data.example.org:443", "a.b.example.org:443"]).within(cap)
    assert AllowList.parse(["*.data.example.org:443", "203.0.113.128/25:80"]).within(cap)
    assert AllowList.parse(["api.example.com:443"]).within(cap)
    for wider in [
        "example.org:443",
        "data.example.org:80",
        "203.0.112.0/23:80",
        "*.example.com:443",
    ]:
        assert not AllowList.parse(["data.example.org:443", wider]).within(cap), wider
    outside = AllowList.parse(["x.example.com:443", "data.example.org:443"]).outside(cap)
    assert [str(grant) for grant in outside] == ["x.example.com:443"]


def test_a_grant_is_part_of_the_task_and_of_its_spec_hash() -> None:
    plain = Task(image="busybox", command=["true"])
    assert Task(image="busybox", command=["true"], network="none").network is None
    assert Task(image="busybox", command=["true"], network={"allow": []}).network is None
    granted = Task(image="busybox", command=["true"], network={"allow": ["a.example.org:443"]})
    assert granted.network is not None and granted.network.allow == ("a.example.org:443",)
    other = Task(image="busybox", command=["true"], network={"allow": ["b.example.org:443"]})
    hashes = {spec_hash(task, image_id="sha256:" + "0" * 64) for task in (plain, granted, other)}
    assert len(hashes) == 3
    # "none" is the task without the field: the same hash
    none = Task(image="busybox", command=["true"], network="none")
    assert spec_hash(none, image_id="sha256:" + "0" * 64) == spec_hash(
        plain, image_id="sha256:" + "0" * 64
    )


def test_a_webassembly_task_cannot_be_granted_a_network(
    executor: WasmExecutor, wasm: WasmFixtures
) -> None:
    task = Task(wasm_file=wasm.hello, network={"allow": ["data.example.org:443"]})
    with pytest.raises(InvalidInput) as caught:
        executor.execute(task)
    assert caught.value.field == "network" and "no sockets" in caught.value.message


# -- the proxy, on loopback ------------------------------------------------------------------


class Origin:
    """A stand-in origin server on loopback: HTTP ``GET`` answers ``hello`` (or ``size``
    bytes)."""

    def __init__(self, size: int | None = None) -> None:
        self.body = b"hello" if size is None else b"x" * size
        self.raw: list[bytes] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = origin.body
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.http.server_address[1])
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


class RawOrigin:
    """A TCP server on loopback that records what a tunnel delivers to it."""

    def __init__(self) -> None:
        self.got = bytearray()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    while data := conn.recv(65536):
                        self.got += data
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


class Proxy:
    """An ``EgressProxy`` on loopback."""

    def __init__(
        self, allow: list[str], *, max_bytes: int = 1 << 30, max_connections: int = 256
    ) -> None:
        self.proxy = EgressProxy(
            AllowList.parse(allow), max_bytes=max_bytes, max_connections=max_connections
        )
        self.port = self.proxy.start("127.0.0.1")

    @property
    def log(self) -> list[Connection]:
        return list(self.proxy.log)

    def request(self, head: str, then: bytes = b"") -> bytes:
        """Send ``head`` (and ``then``) to the proxy; all it answers until it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(head.encode() + then)
            sock.shutdown(socket.SHUT_WR)  # all sent: the tunnel's far end sees its end
            answer = bytearray()
            while data := sock.recv(65536):
                answer += data
            return bytes(answer)

    def close(self) -> None:
        self.proxy.close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    made = Origin()
    yield made
    made.close()


def get(url: str, host: str | None = None) -> str:
    authority = url.split("/")[2]
    return f"GET {url} HTTP/1.1\r\nHost: {host or authority}\r\n\r\n"


def client_hello(server_name: str) -> bytes:
    """The first flight of a TLS client that asks for ``server_name`` (made, never sent out)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_an_address_grant_lets_plain_http_through(origin: Origin) -> None:
    proxy = Proxy([f"127.0.0.1/32:{origin.port}"])
    try:
        answer = proxy.request(get(f"http://127.0.0.1:{origin.port}/data"))
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"hello"), answer
        (entry,) = proxy.log
        assert entry.allowed and entry.address == "127.0.0.1" and entry.received > 5
    finally:
        proxy.close()


def test_a_granted_name_that_resolves_to_a_private_address_is_refused(origin: Origin) -> None:
    """The rebinding guard: ``localhost`` is granted by name, but it resolves to loopback."""
    proxy = Proxy([f"localhost:{origin.port}"])
    try:
        answer = proxy.request(get(f"http://localhost:{origin.port}/data"))
        assert answer.startswith(b"HTTP/1.1 403") and b"not a public address" in answer
        (entry,) = proxy.log
        assert not entry.allowed and entry.reason and "127.0.0.1" in entry.reason
    finally:
        proxy.close()
    # ... unless an address grant names the range it resolves to
    proxy = Proxy([f"localhost:{origin.port}", f"127.0.0.0/8:{origin.port}"])
    try:
        answer = proxy.request(get(f"http://localhost:{origin.port}/data"))
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"hello")
    finally:
        proxy.close()


def test_what_is_not_granted_is_refused(origin: Origin) -> None:
    other = Origin()
    proxy = Proxy([f"localhost:{origin.port}", f"127.0.0.0/8:{origin.port}"])
    try:
        refused = {
            "another port": get(f"http://127.0.0.1:{other.port}/data"),
            "another host": get(f"http://127.0.0.2:{origin.port}/data", "elsewhere.example"),
            "a Host header for another host": get(
                f"http://127.0.0.1:{origin.port}/data", "evil.example"
            ),
            "a CONNECT to another port": f"CONNECT 127.0.0.1:{other.port} HTTP/1.1\r\n\r\n",
        }
        for what, head in refused.items():
            answer = proxy.request(head)
            assert answer.startswith(b"HTTP/1.1 403"), (what, answer)
        assert [entry.allowed for entry in proxy.log] == [False] * len(refused)
    finally:
        proxy.close()
        other.close()
    # An IP literal needs an address grant, even where its name is granted.
    proxy = Proxy([f"localhost:{origin.port}"])
    try:
        answer = proxy.request(get(f"http://127.0.0.1:{origin.port}/data"))
        assert answer.startswith(b"HTTP/1.1 403") and b"address grant" in answer
    finally:
        proxy.close()


@pytest.mark.parametrize(
    "head",
    [
        "garbage\r\n\r\n",
        "GET https://127.0.0.1/ HTTP/1.1\r\n\r\n",  # https goes through CONNECT
        "GET http://user:pw@127.0.0.1:1/ HTTP/1.1\r\n\r\n",
        "GET /relative HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n",
        "GET http://127.0.0.1:99999/ HTTP/1.1\r\n\r\n",
        "GET http://[::1/ HTTP/1.1\r\n\r\n",
    ],
)
def test_a_malformed_request_is_answered_400(head: str) -> None:
    proxy = Proxy(["127.0.0.0/8:80"])
    try:
        assert proxy.request(head).startswith(b"HTTP/1.1 400")
    finally:
        proxy.close()


def test_a_tunnel_carries_tls_only_for_the_name_it_was_opened_to() -> None:
    raw = RawOrigin()
    grants = [f"localhost:{raw.port}", f"127.0.0.0/8:{raw.port}"]
    connect = f"CONNECT localhost:{raw.port} HTTP/1.1\r\nHost: localhost:{raw.port}\r\n\r\n"
    proxy = Proxy(grants)
    try:
        fronted = client_hello("elsewhere.example.org")
        assert client_hello_sni(fronted) == "elsewhere.example.org"
        answer = proxy.request(connect, fronted)
        assert answer.startswith(b"HTTP/1.1 200")  # the tunnel opened, then closed unused
        (entry,) = proxy.log
        assert not entry.allowed and entry.reason and "SNI" in entry.reason
        assert raw.got == b""
        matching = client_hello("localhost")
        proxy.request(connect, matching)
        assert proxy.log[-1].allowed and proxy.log[-1].sent == len(matching)
        for _ in range(100):  # the origin reads it a moment later
            if bytes(raw.got) == matching:
                break
            threading.Event().wait(0.05)
        assert bytes(raw.got) == matching
    finally:
        proxy.close()
        raw.close()


def test_the_byte_and_connection_caps_hold() -> None:
    big = Origin(size=200_000)
    proxy = Proxy([f"127.0.0.1/32:{big.port}"], max_bytes=50_000, max_connections=2)
    try:
        answer = proxy.request(get(f"http://127.0.0.1:{big.port}/data"))
        assert answer.startswith(b"HTTP/1.0 200") and len(answer) < 50_000  # cut at the cap
        assert proxy.log[0].reason is not None and "bytes" in proxy.log[0].reason
        proxy.request(get(f"http://127.0.0.1:{big.port}/data"))
        third = proxy.request(get(f"http://127.0.0.1:{big.port}/data"))
        assert third.startswith(b"HTTP/1.1 403") and b"connections" in third
    finally:
        proxy.close()
        big.close()


def test_a_docker_task_s_grant_is_held_to_the_operator_s() -> None:
    """What the operator allows (``docker.network``) caps a task's grant."""
    grant = {"allow": ["data.example.org:443"]}
    task = Task(image=TEST_IMAGE, command=["true"], network=grant)
    for settings, field, words in [
        ({"enabled": False}, "network", "grants no network"),
        ({"allow": ["*.example.net:443"]}, "network.allow", "data.example.org:443"),
    ]:
        config = Config(docker={"network": settings}, cache={"enabled": False})
        with DockerExecutor(config) as executor, pytest.raises(InvalidInput) as caught:
            executor.execute(task)
        assert caught.value.field == field and words in caught.value.message, caught.value
    with pytest.raises(InvalidInput):
        Config(docker={"network": {"allow": ["not a grant"]}})
    with pytest.raises(InvalidInput) as caught:
        Config(docker={"network": {"subnet": "8.8.8.0/24"}})
    assert "private" in caught.value.message


def host_routes() -> str:
    return subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout


def veths() -> set[str]:
    found = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True)
    return {line.split(":")[1].strip().split("@")[0] for line in found.stdout.decode().splitlines()}


#: What a task's script prints for each probe: ``NAME=0`` if it worked, else its exit status.
PROBES = """
proxy=${HTTP_PROXY#http://}; host=${proxy%:*}
probe() { name=$1; shift; "$@" >/tmp/out 2>&1; echo "$name=$?"; }
probe granted timeout 5 wget -q -O /tmp/granted http://localhost:@PORT@/data
echo "body=$(cat /tmp/granted)"
probe other_port timeout 5 wget -q -O - http://localhost:@OTHER@/data
probe host_name_not_granted timeout 5 wget -q -O - http://not-granted.example.org:@PORT@/
probe direct_tcp_to_host timeout 3 wget -Y off -q -O - http://$host:@OPEN@/
probe direct_to_proxy_host_other_port timeout 3 nc $host @OPEN@
probe dns_to_host timeout 3 nslookup example.org $host
echo datagram | timeout 2 nc -u $host @UDP@ >/dev/null 2>&1
probe route_change ip route add default via $host
probe address_change ip addr add 10.9.9.9/32 dev lo
probe ipv6 sh -c 'ip -6 addr | grep -q inet6'
echo "disable_ipv6=$(cat /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null)"
echo "links=$(ip -o link | cut -d: -f2 | tr '\\n' ,)"
echo "routes=$(ip -4 route | cut -d' ' -f1 | tr '\\n' ' ')"
"""


@pytest.fixture(params=["runc", "runsc"])
def egress_runtime(request: pytest.FixtureRequest, docker_executor: DockerExecutor) -> str:
    """Each test that takes this runs its tasks granted a network under runc and under runsc
    (gVisor, through the runsc-egress runtime that scripts/docker-setup.sh registers)."""
    name: str = request.param
    if name not in docker_executor.runtimes:
        pytest.fail(f"the Docker daemon has no {name} runtime")
    if name == "runsc":
        problem = docker_executor.runsc_egress_problem()
        assert problem is None, problem
    return name


def test_doctor_says_whether_runsc_egress_is_available() -> None:
    usable, said = DockerExecutor.diagnose(Config(cache={"enabled": False}))
    assert usable and "runsc egress: yes" in said, said


def test_a_docker_task_reaches_what_it_is_granted_and_nothing_else(
    docker_executor: DockerExecutor, egress_runtime: str, origin: Origin
) -> None:
    other = Origin()
    anywhere = socket.create_server(("0.0.0.0", 0))  # a host service on every address
    open_port = int(anywhere.getsockname()[1])
    datagrams = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # and a UDP one
    datagrams.bind(("0.0.0.0", 0))
    datagrams.setblocking(False)
    routes = host_routes()
    try:
        script = (
            PROBES.replace("@PORT@", str(origin.port))
            .replace("@OTHER@", str(other.port))
            .replace("@OPEN@", str(open_port))
            .replace("@UDP@", str(datagrams.getsockname()[1]))
        )
        grant = [f"localhost:{origin.port}", f"127.0.0.0/8:{origin.port}"]
        task = Task(
            id=f"egress-{egress_runtime}-{os.getpid()}",
            image=TEST_IMAGE,
            command=["sh", "-c", script],
            oci_runtime=egress_runtime,
            network={"allow": grant},
        )
        result = docker_executor.execute(task)
        assert result.runtime is not None and result.runtime.oci_runtime == egress_runtime
        probes = dict(
            line.split("=", 1) for line in result.stdout.decode().splitlines() if "=" in line
        )
        assert probes["granted"] == "0" and probes["body"] == "hello", result.stdout
        for refused in [
            "other_port",
            "host_name_not_granted",
            "direct_tcp_to_host",
            "direct_to_proxy_host_other_port",
            "dns_to_host",
            "route_change",
            "address_change",
            "ipv6",
        ]:
            assert probes[refused] != "0", (refused, result.stdout)
        # Loopback and its veth, and a route to its /30 only (no default), under runc and
        # under gVisor alike.
        links = [name.strip().split("@")[0] for name in probes["links"].split(",")]
        interfaces = sorted(name for name in links if name)
        assert interfaces[0] == "lo" and len(interfaces) == 2, result.stdout
        assert interfaces[1].startswith("psb"), result.stdout
        task_routes = set(probes["routes"].split()) - {"127.0.0.0/8"}
        assert len(task_routes) == 1, result.stdout
        (subnet,) = task_routes
        assert ipaddress.ip_network(subnet).prefixlen == 30, result.stdout
        if egress_runtime == "runc":
            assert probes["disable_ipv6"] == "1"
        seen = [(c.host, c.port, c.allowed) for c in result.connections]
        assert ("localhost", origin.port, True) in seen
        assert ("localhost", other.port, False) in seen
        assert ("not-granted.example.org", origin.port, False) in seen
        granted = next(c for c in result.connections if c.allowed)
        assert granted.address == "127.0.0.1" and granted.received > 0
        with pytest.raises(BlockingIOError):  # the task's datagram never reached the host
            datagrams.recvfrom(64)
        # nothing new on the host's routes, once the veth (removed in the background) is gone
        for _ in range(50):
            if host_routes() == routes:
                break
            threading.Event().wait(0.1)
        assert host_routes() == routes
        assert managed_containers(docker_executor, task.id) == []  # task and pause gone
        gone_within(f"{interfaces[1][:-1]}h", 5.0)
    finally:
        anywhere.close()
        datagrams.close()
        other.close()


def test_a_granted_task_that_times_out_leaves_nothing(
    docker_executor: DockerExecutor, egress_runtime: str
) -> None:
    """At the deadline the task's container goes, and with it (under runsc) the pause
    container that holds its namespace, and its veth."""
    task = Task(
        id=f"egress-timeout-{egress_runtime}-{os.getpid()}",
        image=TEST_IMAGE,
        command=["sh", "-c", "ip -o link | grep -o 'psb[0-9a-f]*c'; sleep 60"],
        oci_runtime=egress_runtime,
        limits={"timeout": "3s"},
        network={"allow": ["localhost:80", "127.0.0.1/32:80"]},
    )
    with pytest.raises(ExecutionTimeout) as caught:
        docker_executor.execute(task)
    partial = caught.value.result
    assert partial is not None
    task_end = partial.stdout.decode().strip()
    assert task_end.startswith("psb") and task_end.endswith("c"), partial
    assert managed_containers(docker_executor, task.id) == []
    gone_within(f"{task_end[:-1]}h", 5.0)


def gone_within(veth: str, seconds: float) -> None:
    """Assert that the host's end of a task's veth is gone within ``seconds`` (it is removed
    in the background)."""
    for _ in range(int(seconds * 10)):
        if veth not in veths():
            return
        threading.Event().wait(0.1)
    assert veth not in veths()


#: Each task tries the proxy port at the first 32 slots' host addresses but its own: what
#: wget says of each (a proxy that answered would make it say "server returned error").
OTHER_PROXIES = """
own=${HTTP_PROXY#http://}; own=${own%:*}
for n in $(seq 0 31); do
  address=10.232.0.$((n * 4 + 1))
  [ "$address" = "$own" ] && continue
  (said=$(timeout 2 wget -Y off -q -O /dev/null http://$address:3128/ 2>&1); \
   echo "to $address=$? $said") &
done
wait
"""


def test_parallel_tasks_each_get_only_their_own_grant(
    docker_executor: DockerExecutor, egress_runtime: str
) -> None:
    """20 tasks at once (6 under gVisor, whose sandboxes are heavier), each granted its own
    origin: each reaches that one only, and no other task's proxy."""
    origins = [Origin() for _ in range(20 if egress_runtime == "runc" else 6)]
    try:
        fetch_all = " ".join(
            f"timeout 5 wget -q -O /dev/null http://localhost:{o.port}/ && echo {o.port};"
            for o in origins
        )
        tasks = [
            Task(
                image=TEST_IMAGE,
                command=["sh", "-c", fetch_all + OTHER_PROXIES],
                oci_runtime=egress_runtime,
                network={"allow": [f"localhost:{o.port}", f"127.0.0.1/32:{o.port}"]},
            )
            for o in origins
        ]
        results = docker_executor.execute_many(tasks)
        for own, result in zip(origins, results, strict=True):
            assert result.ok, result
            lines = result.stdout.decode().split("\n")
            assert [line for line in lines if line.isdigit()] == [str(own.port)], result.stdout
            others = [line for line in lines if line.startswith("to ")]
            assert len(others) == 31
            # no route beyond its own /30 ("Network unreachable"; gVisor says "No route to
            # host"), or dropped (a timeout)
            assert all(
                "unreachable" in line or "No route to host" in line or "=124" in line
                for line in others
            ), others
    finally:
        for made in origins:
            made.close()


KILLED_RUN = """
import sys
from parity_sandbox import Config, DockerExecutor, Task
with DockerExecutor(Config(cache={"enabled": False})) as executor:
    executor.execute(Task(image=sys.argv[1], command=["sleep", "60"], oci_runtime=sys.argv[2],
                          network={"allow": ["localhost:80", "127.0.0.1/32:80"]}))
"""


def test_a_killed_process_s_egress_is_reaped(
    docker_executor: DockerExecutor, egress_runtime: str, tmp_path: Any
) -> None:
    """A SIGKILL leaves the veth and the containers (under runsc: the task's and the pause
    container that holds its namespace) to the next reap, which finds and removes them."""
    api = docker_executor._api
    before = veths()
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    child = subprocess.Popen([sys.executable, str(script), TEST_IMAGE, egress_runtime])
    expected = 2 if egress_runtime == "runsc" else 1
    made: set[str] = set()
    containers: list[str] = []
    try:
        for _ in range(300):
            made = {name for name in veths() - before if name.startswith("psb")}
            containers = containers_of(docker_executor, child.pid)
            running = [c for c in containers if api.inspect_container(c)["State"]["Running"]]
            if made and len(running) == expected:
                break
            threading.Event().wait(0.1)
        assert made, "the task's veth did not appear"
        assert len(containers) == expected, containers
        roles = sorted(
            (api.inspect_container(c)["Config"]["Labels"] or {}).get(docker_spec.ROLE, "task")
            for c in containers
        )
        assert roles == (["netns", "task"] if egress_runtime == "runsc" else ["task"])
        # The veth is made just before the task's go; killed before it, the container's init
        # would see its stdin end and exit, taking the veth with it. A moment later the task
        # runs (sleep 60), and only a reap cleans up.
        threading.Event().wait(1.0)
    finally:
        child.kill()
        child.wait()
    assert made <= veths()  # left behind by the SIGKILL
    assert set(containers) <= set(containers_of(docker_executor, child.pid))
    docker_executor.reap()
    assert not made & veths()
    assert containers_of(docker_executor, child.pid) == []


def test_the_cli_grants_with_allow(wasm: WasmFixtures) -> None:
    cli = [sys.executable, "-m", "parity_sandbox.cli", "run"]
    bad = subprocess.run([*cli, "--allow", "no-port", str(wasm.hello)], capture_output=True)
    assert bad.returncode == 65 and b"network.allow" in bad.stderr
    wasm_task = subprocess.run(
        [*cli, "--allow", "data.example.org:443", str(wasm.hello)], capture_output=True
    )
    assert wasm_task.returncode == 65 and b"no sockets" in wasm_task.stderr
