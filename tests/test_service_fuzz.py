"""The HTTP service fuzzed from its own OpenAPI schema (schemathesis): a real ``parity-sandbox
serve`` process on loopback, one key, every operation of its ``/openapi.json`` sent a bounded,
derandomized set of generated requests (schemathesis's examples, coverage and fuzzing phases),
each answer checked strictly: never a 5xx; status code, content type, headers and body as the
schema declares them; schema-valid input accepted and schema-invalid input refused. Then a few
inputs no schema can describe, and: the server still answers and its log holds no traceback."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("schemathesis")

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from service_server import Service

#: Generated requests per operation in the fuzzing phase (the examples and coverage phases add
#: their own deterministic cases); with ``derandomize`` every run sends the same requests.
MAX_EXAMPLES = 25

#: Every response check schemathesis has for a single request, none relaxed globally.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    missing_required_header,
    unsupported_method,
]

#: schemathesis's default for ``positive_data_acceptance``, plus 422, for the operations whose
#: body carries what JSON Schema cannot say: a valid WebAssembly module, bytes whose SHA-256
#: the path names, a callback host that resolves to a public address. There a schema-valid
#: request may still be refused; everything else about the answer stays checked.
SEMANTIC_BODY = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
SEMANTIC_BODY_OPERATIONS = [
    ("POST", "/v1/tasks"),
    ("POST", "/v1/batches"),
    ("PUT", "/v1/modules/{sha256}"),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    server = Service(tmp_path_factory.mktemp("state"), tmp_path_factory.mktemp("cache"))
    server.make_key("fuzz")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_schema(service: Service) -> schemathesis.BaseSchema:
    """The schema the live server publishes; every request carries the fuzz key."""
    config = schemathesis.Config.from_dict(
        {
            "base-url": service.url,
            "headers": {"Authorization": f"Bearer {service.keys['fuzz']}"},
            "seed": 0,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
            "request-timeout": 30,
            "operations": [
                {
                    "include-method": method,
                    "include-path": path,
                    "checks": {"positive_data_acceptance": {"expected-statuses": SEMANTIC_BODY}},
                }
                for method, path in SEMANTIC_BODY_OPERATIONS
            ],
        }
    )
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's ``from_fixture`` reads and rewrites ``item._nodeid``, which pytest
    9.2 no longer has (the id lives in ``item._id``); give it one to read. Only the names of
    the per-operation reports depend on it."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_every_operation_answers_as_its_schema_says(
    case: schemathesis.Case[Any],
) -> None:
    case.call_and_validate(checks=CHECKS)


#: A valid module, so that each body below is refused for the one thing it gets wrong.
_MODULE = base64.b64encode(b"\0asm\x01\0\0\0").decode()

#: Requests no generator derives from the schema (the task body is not in it, and a digit that
#: ``str.isdigit`` accepts but ``int`` refuses is too rare to be drawn): each must be refused
#: as the client's fault, with a problem, never a 500.
HOSTILE: list[tuple[str, str, dict[str, Any]]] = [
    ("cursor-superscript-digit", "GET", {"url": "/v1/tasks", "params": {"cursor": "²"}}),
    ("callback-unclosed-ipv6", "POST", {"json": {"callback_url": "http://[::1"}}),
    ("callback-bracketed-name", "POST", {"json": {"callback_url": "http://[abc]/"}}),
    ("callback-64-char-label", "POST", {"json": {"callback_url": f"http://{'a' * 64}.com/"}}),
    ("callback-empty-label", "POST", {"json": {"callback_url": "http://../"}}),
    ("input-files-a-string", "POST", {"json": {"input_files": "abc"}}),
    ("input-files-a-list", "POST", {"json": {"input_files": ["a"]}}),
    ("json-nested-too-deep", "POST", {"content": b"[" * 100_000}),
]


@pytest.mark.parametrize(
    ("method", "request_args"),
    [pytest.param(method, args, id=name) for name, method, args in HOSTILE],
)
def test_inputs_no_schema_describes_get_a_problem(
    service: Service, method: str, request_args: dict[str, Any]
) -> None:
    args = dict(request_args)
    url = args.pop("url", "/v1/tasks")
    if "json" in args:
        args["content"] = json.dumps({"wasm_module": _MODULE, **args.pop("json")}).encode()
    with service.client(service.keys["fuzz"]) as client:
        response = client.request(method, url, **args)
    assert response.status_code == 422, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/problem+json"


def test_the_server_survived_the_fuzzing(service: Service) -> None:
    """Runs last (pytest keeps the file's order): the server answers, its log is clean."""
    assert httpx.get(f"{service.url}/healthz", timeout=10).status_code == 200
    log = service.log()
    assert "Traceback" not in log, _defects(log)


def _defects(log: str) -> str:
    """The gist of each traceback in the server's log: the app's frames and the exception."""
    gist = [
        line
        for line in log.splitlines()
        if ("parity_sandbox" in line and line.lstrip().startswith("File "))
        or re.match(r"\w+(Error|Exception)\b", line)
    ]
    return "\n".join(dict.fromkeys(gist)) or log
