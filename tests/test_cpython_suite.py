"""Ordinary programs must not notice the hardening: a few modules of CPython's own test suite
(the kernel interfaces a Python program uses most) give the same outcome, test by test, in our
containers under runc and runsc as in a plain ``docker run --user 65534:65534 --read-only
--network none``, but for the differences the README's threat model lists.

The image comes from ``scripts/build-cpython-suite-image.sh`` (run by ``scripts/test.sh``);
``bench/cpython_suite.py`` runs the whole selection and prints the comparison table.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import docker
import docker.errors
import pytest

from parity_sandbox import DockerExecutor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import cpython_suite  # the harness lives with the benchmark

#: Fast modules (a few seconds each) over files and descriptors, memory maps, polling, limits
#: and ptys (test_signal, at 50 s a run, is left to the benchmark).
SUBSET = ("test_fcntl", "test_mmap", "test_os", "test_pty", "test_resource", "test_select")
TIMEOUT = 120.0
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def plain_docker() -> Iterator[docker.DockerClient]:
    """The docker SDK's own client, for the plain containers of the baseline."""
    try:
        client = docker.from_env(timeout=int(TIMEOUT) + 60)
    except docker.errors.DockerException as exc:
        if os.environ.get("PARITY_TEST_DOCKER") == "required":
            pytest.fail(f"the Docker engine is required here: {exc}")
        pytest.skip(f"no Docker engine: {exc}")
    try:
        try:
            client.images.get(cpython_suite.IMAGE)
        except docker.errors.ImageNotFound:
            message = f"{cpython_suite.IMAGE} is missing: run scripts/build-cpython-suite-image.sh"
            if os.environ.get("PARITY_TEST_CPYTHON_SUITE") == "required":
                pytest.fail(message)
            pytest.skip(message)
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def baselines(plain_docker: docker.DockerClient) -> dict[str, cpython_suite.ModuleRun]:
    """Each module of the subset in a plain container, once for both runtimes."""
    return {module: cpython_suite.run_baseline(plain_docker, module, TIMEOUT) for module in SUBSET}


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("module", SUBSET)
def test_the_suite_cannot_tell_our_container_from_a_plain_one(
    module: str,
    oci_runtime: str,
    docker_executor: DockerExecutor,
    plain_docker: docker.DockerClient,
    baselines: dict[str, cpython_suite.ModuleRun],
) -> None:
    base = baselines[module]
    assert base.tests, f"the baseline ran no test of {module}:\n{base.tail}"
    ours = cpython_suite.run_ours(docker_executor, oci_runtime, module, TIMEOUT)
    comparison = cpython_suite.compare(base, ours)
    if comparison.unexplained:  # run those again, alone: a timing fluke must not fail this
        patterns = cpython_suite.match_patterns(comparison.unexplained)
        cpython_suite.confirm(
            comparison,
            cpython_suite.run_baseline(plain_docker, module, TIMEOUT, patterns),
            cpython_suite.run_ours(docker_executor, oci_runtime, module, TIMEOUT, patterns),
        )
    assert not comparison.unexplained, (
        "\n".join(
            f"{d.test}: {cpython_suite.short(d.baseline)} -> {cpython_suite.short(d.ours)}"
            for d in comparison.unexplained
        )
        + f"\n{ours.tail}"
    )
    assert comparison.same > 0


def test_a_difference_is_found_and_only_a_known_one_explained() -> None:
    def run(setup: str, **tests: str) -> cpython_suite.ModuleRun:
        outcomes = {name: cpython_suite.Outcome(kind) for name, kind in tests.items()}
        return cpython_suite.ModuleRun(setup, "test_x", outcomes, "0", 1.0)

    base = run("baseline", a="ok", b="ok", c="skipped", d="ok")
    ours = run("runsc", a="ok", b="ERROR", c="skipped")
    comparison = cpython_suite.compare(base, ours)
    assert (comparison.tests, comparison.same) == (4, 2)
    assert [(d.test, d.baseline.kind, d.ours.kind) for d in comparison.differences] == [
        ("b", "ok", "ERROR"),
        ("d", "ok", "missing"),
    ]
    known = {("runsc", "b"): "gVisor", ("runc", "d"): "elsewhere"}
    assert cpython_suite.known_reason("runsc", "b", known) == "gVisor"
    assert cpython_suite.known_reason("runsc", "d", known) == ""


def test_the_runner_reads_outcomes_and_folds_subtests_into_their_test() -> None:
    stdout = (
        'noise\n\x1e{"id": "m.C.t1", "outcome": "ok", "detail": ""}\x1e\n'
        'x \x1e{"id": "m.C.t2 (i=1)", "outcome": "FAIL", "detail": "boom", "parent": "m.C.t2"}'
        '\x1e\n\x1e{"id": "m.C.t3", "outcome": "skipped", "detail": "no pty"}\x1e'
    )
    found = cpython_suite.outcomes(stdout)
    assert {name: o.kind for name, o in found.items()} == {
        "m.C.t1": "ok",
        "m.C.t2": "FAIL",
        "m.C.t3": "skipped",
    }
    assert found["m.C.t2"].detail == "subtest (i=1): boom"


def test_every_known_difference_is_in_the_readme() -> None:
    """The threat model names each known difference's module, and the test where one is named."""
    text = README.read_text()
    for _, pattern in cpython_suite.KNOWN:
        module, name = pattern.split(".")[1], pattern.rsplit(".", 1)[-1]
        assert f"`{module}" in text, f"README.md's threat model does not name {module}"
        if not any(wild in name for wild in "*?["):
            assert f"`{name}`" in text, f"README.md's threat model does not list {pattern}"


def test_a_test_that_never_ends_is_found_and_the_rest_of_its_module_runs_without_it() -> None:
    def record(test: str, outcome: str, parent: str | None = None) -> str:
        fields = {"id": test, "outcome": outcome, "detail": ""}
        if parent is not None:
            fields["parent"] = parent
        return "\x1e" + json.dumps(fields) + "\x1e\n"

    first = (
        record("m.C.t1", "started")
        + record("m.C.t1 (i=1)", "FAIL", parent="m.C.t1")
        + record("m.C.t1", "FAIL")
        + record("m.C.t2", "started")
    )
    assert cpython_suite.stopped_in(first) == "m.C.t2"
    assert cpython_suite.stopped_in(first + record("m.C.t2", "ok")) is None
    failed_then_hung = record("m.C.t2 (i=1)", "FAIL", parent="m.C.t2")
    assert cpython_suite.stopped_in(first + failed_then_hung) == "m.C.t2"
    passes: list[list[str]] = []

    def run_pass(done: Sequence[str]) -> cpython_suite.ModuleRun:
        passes.append(list(done))
        stdout = first if not done else record("m.C.t3", "started") + record("m.C.t3", "ok")
        return cpython_suite.ModuleRun(
            "runsc",
            "m",
            cpython_suite.outcomes(stdout),
            "1" if not done else "0",
            1.0,
            stopped_in=cpython_suite.stopped_in(stdout),
            timed_out=not done,
        )

    run = cpython_suite.resume(run_pass)
    assert passes == [[], ["m.C.t1", "m.C.t2"]]
    assert {name: o.kind for name, o in run.tests.items()} == {
        "m.C.t1": "FAIL",
        "m.C.t2": "hang",
        "m.C.t3": "ok",
    }
    assert (run.status, run.resumed, run.seconds, run.stopped_in) == ("0", 1, 2.0, None)
    done = cpython_suite.environment(["m.C.t1", "setUpClass (m.C)"])["PARITY_SUITE_DONE"]
    assert json.loads(zlib.decompress(base64.b64decode(done))) == ["m.C.t1"]
