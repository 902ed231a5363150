"""Ordinary programs must not notice the hardening: CPython's own test suite, module by module,
in a plain container and in ours (runc and runsc), compared test by test.

    .venv/bin/python bench/cpython_suite.py [--modules test_os,test_pty] [--runtimes runc,runsc]
        [--timeout 900] [--json results.json] [--no-confirm]

Needs the engine of ``scripts/docker-setup.sh`` and the image of
``scripts/build-cpython-suite-image.sh`` (Debian's ``python3`` and
``libpython3.11-testsuite``, made offline with debootstrap). Each module runs, one after the
other, under regrtest (``python3 -m test -v``, resources ``all`` but largefile, network,
urlfetch, gui, audio, curses and cpu):

- **baseline**: the docker SDK's ``docker run --user 65534:65534 --read-only --network none
  --init`` on the same image, given what our containers give a task to write to: a tmpfs at
  ``/work`` (the working directory, owned by the user, exec) and at ``/tmp`` (1777, exec), both
  of ``DISK``, and the same environment (``HOME=/work``, ``TMPDIR=/tmp``). ``--init``
  (Docker's tini) because our containers' process 1 is our init too: a Python that is process
  1 ignores signals it has no handler for, which the suite would notice and we would not. No
  memory, pids or CPU limit: Docker's defaults.
- **ours**: ``DockerExecutor`` with ``oci_runtime`` runc, then runsc, and generous limits
  (``LIMITS``); every hardened default as it is.

A few lines of Python around regrtest report each test's outcome as it happens (ok, FAIL,
ERROR, skipped with its reason, expected failure, unexpected success; a failing subtest fails
its test), on a descriptor of their own, so that what tests print cannot be taken for one.
Tests whose outcome differs from the baseline's are run again, alone, in both (``--no-confirm``
skips that): a difference that goes away is reported as flaky, not as a difference.
A test that runs longer than ``PER_TEST`` is ended (it is ``hang``), and the rest of its
module runs again without the tests already done, so one hung test costs a few minutes, not
the module's other tests. Tests that always hang under runsc, in a plain runsc container too,
are left out everywhere (``IGNORED``). Differences that ``KNOWN`` explains (the README's
threat model lists them, each with the setting behind it) are shown with their reason; any
other is unexplained. The exit status is non-zero only when the harness itself fails (no
engine, no image, a run that produced nothing).
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import json
import re
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions

from parity_sandbox import Config, DockerExecutor, Result, SandboxError, Task

IMAGE = "parity-sandbox-test/cpython-suite:bookworm"
BASELINE = "baseline"
DISK = "1g"
LIMITS: dict[str, Any] = {
    "memory": "4g",
    "cpu": 2,
    "pids": 4096,
    "disk": DISK,
    "output": "256m",
}
ENV = {"HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
#: Differences run again at most (per module and runtime).
MAX_CONFIRM = 200
#: Seconds one test may run before it counts as hung: the run stops there, and the rest of
#: the module runs again without the tests already done (at most ``MAX_HANGS`` times).
PER_TEST = 180.0
MAX_HANGS = 5
RESOURCES = "all,-largefile,-network,-urlfetch,-gui,-audio,-curses,-cpu"

#: The issue's thirteen, then others that exercise the same kernel interfaces.
NAMED = (
    "test_threading",
    "test_concurrent_futures",
    "test_subprocess",
    "test_os",
    "test_signal",
    "test_socket",
    "test_select",
    "test_asyncio",
    "test_mmap",
    "test_fcntl",
    "test_resource",
    "test_multiprocessing_forkserver",
    "test_pty",
)
MODULES = (
    *NAMED,
    "test_posix",
    "test_time",
    "test_tempfile",
    "test_shutil",
    "test_selectors",
    "test_epoll",
    "test_poll",
    "test_thread",
    "test_threadsignals",
    "test_queue",
    "test_pathlib",
    "test_glob",
    "test_pwd",
    "test_grp",
    "test_fileio",
    "test_sched",
    "test_faulthandler",
    "test_openpty",
    "test_fork1",
    "test_wait3",
    "test_wait4",
    "test_logging",
    "test_sys",
)

_FSIZE = (
    "ulimit fsize = limits.file_size (default: the disk cap): no file, sparse or not, grows past it"
)
_IPV6 = (
    "ours has IPv6 loopback (no libnetwork sandbox; --network none turns IPv6 off): runs "
    "where the baseline skips"
)
_HOSTNAME = "our /etc/hosts maps the host name (sandbox) to loopback: resolves, unlike the baseline"
_GVISOR = "gVisor (a plain runsc container does the same): "

#: Tests left out everywhere, since under runsc they hang, and the rest of their module with
#: them (in a plain runsc container too): KNOWN gives the reason.
IGNORED = {
    "test_socket": ("test.test_socket.NetworkConnectionAttributesTest.testSourceAddress",),
    "test_asyncio": ("*.test_subprocess_kill", "*.test_subprocess_send_signal"),
}

#: Differences from the baseline that are deliberate or the OCI runtime's own, as
#: ``(runtime or "*", test id glob)`` -> why; README.md's threat model lists them.
KNOWN: dict[tuple[str, str], str] = {
    ("*", "test.test_mmap.LargeMmapTests.*"): _FSIZE,
    ("*", "test.test_resource.ResourceTest.test_fsize_ismax"): _FSIZE,
    ("*", "test.test_socket.*6Test.*"): _IPV6,
    ("*", "test.test_socket.CreateServer*Test.test_*"): _IPV6,
    ("*", "test.test_socket.GeneralModuleTests.test_*ipv6*"): _IPV6,
    ("*", "test.test_socket.GeneralModuleTests.test_flowinfo"): _IPV6,
    ("*", "test.test_asyncio.*ipv6*"): _IPV6,
    ("*", "test.test_asyncio.*_dual_stack"): _IPV6,
    ("*", "test.test_asyncio.*.test_create_datagram_endpoint_no_matching_family"): _IPV6,
    ("*", "test.test_logging.IPv6SysLogHandlerTest.*"): _IPV6,
    ("*", "test.test_socket.GeneralModuleTests.testHostnameRes"): _HOSTNAME,
    ("*", "test.test_socket.GeneralModuleTests.testSockName"): _HOSTNAME,
    ("runsc", "test.test_fcntl.TestFcntl.test_fcntl_64_bit"): _GVISOR + "no F_NOTIFY (EINVAL)",
    ("runsc", "test.test_socket.NetworkConnectionAttributesTest.testSourceAddress"): (
        _GVISOR + "create_connection() with a source port fails, and the test's accept() then "
        "waits forever (left out everywhere: IGNORED)"
    ),
    ("runsc", "test.test_asyncio.*.test_subprocess_kill"): (
        _GVISOR + "hangs (cause not examined; left out everywhere: IGNORED)"
    ),
    ("runsc", "test.test_asyncio.*.test_subprocess_send_signal"): (
        _GVISOR + "hangs (cause not examined; left out everywhere: IGNORED)"
    ),
    ("runsc", "test.test_asyncio.*.test_bidirectional_pty"): (
        _GVISOR + "tty.setraw() on a pty's slave end: ENOTTY"
    ),
    ("runsc", "test.test_posix.PosixTester.test_fs_holes"): _GVISOR + "no SEEK_DATA/SEEK_HOLE",
    ("runsc", "test.test_posix.PosixTester.test_pidfd_open"): _GVISOR + "pidfd_open: ENOSYS",
    ("runsc", "test.test_posix.PosixTester.test_sched_priority"): (
        _GVISOR + "sched_get_priority_min accepts an invalid policy"
    ),
    ("runsc", "test.test_posix.PosixTester.test_sched_rr_get_interval"): (
        _GVISOR + "sched_rr_get_interval: EPERM"
    ),
    ("runsc", "test.test_posix.TestPosixSpawn*.test_setscheduler_only_param"): (
        _GVISOR + "sched_setparam: EPERM"
    ),
    ("runsc", "test.test_socket.*UDPLITE*"): _GVISOR + "no UDP-Lite (EPROTONOSUPPORT)",
    ("runsc", "test.test_socket.TestLinuxAbstractNamespace.testAutobind"): (
        _GVISOR + "binding a Unix socket to an empty address (autobind): EINVAL"
    ),
    ("runsc", "test.test_os.FileTests.test_copy_file_range*"): _GVISOR + "copy_file_range: ENOSYS",
    ("runsc", "test.test_resource.ResourceTest.test_prlimit"): (
        _GVISOR + "prlimit's error for a soft limit above the hard one"
    ),
    **{
        ("runsc", f"test.test_pty.PtyTest.{name}"): _GVISOR
        + "a pty master read blocks after the slave closes (Linux: EIO)"
        for name in ("test_fork", "test_master_read", "test_spawn_doesnt_hang")
    },
    ("runsc", "test.test_signal.PidfdSignalTest.test_pidfd_send_signal"): (
        _GVISOR + "no pidfds (pidfd_open: ENOSYS)"
    ),
    ("runsc", "test.test_subprocess.POSIXProcessTestCase.test_restore_signals"): (
        _GVISOR + "no SigIgn line in /proc/self/status"
    ),
}

# Runs regrtest and reports every test's start and end on a descriptor of its own: a line
# "\x1e{json}\x1e" (JSON escapes \x1e, so no text a test prints can pass for one). A test
# that runs longer than PARITY_SUITE_PER_TEST seconds ends the process (faulthandler: its
# traceback, status 1); the tests in PARITY_SUITE_DONE (zlib, base64: JSON ids) are left out.
RUNNER = r"""
import base64, faulthandler, fcntl, json, os, sys, traceback, unittest.result, zlib

_fd = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 900)
_base = unittest.result.TestResult
_per_test = float(os.environ.pop("PARITY_SUITE_PER_TEST", "0"))
_done = os.environ.pop("PARITY_SUITE_DONE", "")
if _done:
    _ids = json.loads(zlib.decompress(base64.b64decode(_done)))
    sys.argv[1:1] = ["-i" + test_id for test_id in _ids]


def _emit(test, outcome, detail="", parent=None):
    record = {"id": test.id(), "outcome": outcome, "detail": detail[-600:]}
    if parent is not None:
        record["parent"] = parent.id()
    os.write(_fd, ("\n\x1e" + json.dumps(record) + "\x1e\n").encode())


def _why(err):
    return "".join(traceback.format_exception_only(err[0], err[1])).strip()


def _wrap(name, outcome, detail=None):
    original = getattr(_base, name)

    def hook(self, test, *rest):
        _emit(test, outcome, detail(*rest) if detail else "")
        return original(self, test, *rest)

    setattr(_base, name, hook)


_wrap("addSuccess", "ok")
_wrap("addFailure", "FAIL", _why)
_wrap("addError", "ERROR", _why)
_wrap("addSkip", "skipped", str)
_wrap("addExpectedFailure", "expected failure")
_wrap("addUnexpectedSuccess", "unexpected success")
_sub = _base.addSubTest


def _subtest(self, test, subtest, err):
    if err is not None:
        bad = issubclass(err[0], test.failureException)
        _emit(subtest, "FAIL" if bad else "ERROR", _why(err), parent=test)
    return _sub(self, test, subtest, err)


_base.addSubTest = _subtest
_start, _stop = _base.startTest, _base.stopTest


def _started(self, test):
    _emit(test, "started")
    if _per_test:
        faulthandler.dump_traceback_later(_per_test, exit=True)
    return _start(self, test)


def _stopped(self, test):
    if _per_test:
        faulthandler.cancel_dump_traceback_later()
    return _stop(self, test)


_base.startTest, _base.stopTest = _started, _stopped
from test.libregrtest import main

main()
"""
_RECORD = re.compile(r"\x1e(\{.*?\})\x1e")
_TIMER = re.compile(r"^Timeout \(\d+:\d\d:\d\d(\.\d+)?\)!$", re.MULTILINE)
_WORST = ("ERROR", "FAIL")


@dataclass
class Outcome:
    """One test's end: ``ok``, ``FAIL``, ``ERROR``, ``skipped``, ``expected failure``,
    ``unexpected success``, ``hang`` (ran longer than ``PER_TEST``), ``crash`` (the process
    ended during it), or ``missing`` (never reported: the module's run ran out of time)."""

    kind: str
    detail: str = ""


@dataclass
class ModuleRun:
    """One module under one setup."""

    setup: str
    module: str
    tests: dict[str, Outcome]
    #: regrtest's exit status, or what ended the run (``timeout``, ``memory``, ...).
    status: str
    seconds: float
    tail: str = ""
    #: The test the run stopped in (it started and never ended), for a run that failed.
    stopped_in: str | None = None
    #: Whether the runner's per-test timer ended the run (faulthandler's "Timeout" report).
    timed_out: bool = False
    #: How many times the module ran again without the tests done (after a hang or crash).
    resumed: int = 0


def outcomes(stdout: str) -> dict[str, Outcome]:
    """Each test's outcome from the runner's records (a failing subtest fails its test)."""
    found: dict[str, Outcome] = {}
    for match in _RECORD.finditer(stdout):
        record = json.loads(match.group(1))
        kind, detail = str(record["outcome"]), str(record.get("detail", ""))
        if kind == "started":
            continue
        test = str(record.get("parent", record["id"]))
        if "parent" in record:
            sub = str(record["id"])[len(test) :].strip()
            detail = f"subtest {sub}: {detail}"
        have = found.get(test)
        if have is None or have.kind not in _WORST or kind == "ERROR":
            found[test] = Outcome(kind, detail)
    return found


def stopped_in(stdout: str) -> str | None:
    """The last test that started and never ended (``None``: every one ended)."""
    last = None
    for match in _RECORD.finditer(stdout):
        record = json.loads(match.group(1))
        if record["outcome"] == "started":
            last = str(record["id"])
        elif "parent" not in record and str(record["id"]) == last:
            last = None  # its end (a subtest's record is not: the test may still hang)
    return last


def ended(
    setup: str, module: str, status: str, seconds: float, stdout: str, stderr: str
) -> ModuleRun:
    """One pass of ``module`` under ``setup``, from what it printed."""
    return ModuleRun(
        setup,
        module,
        outcomes(stdout),
        status,
        seconds,
        tail=(stdout + stderr)[-2000:],
        stopped_in=stopped_in(stdout),
        timed_out=bool(_TIMER.search(stderr)),
    )


def environment(done: Iterable[str]) -> dict[str, str]:
    """The tests' environment, and the runner's: the per-test limit, the tests to leave out."""
    ids = sorted(test for test in done if " " not in test)  # not "setUpClass (module.C)"
    packed = base64.b64encode(zlib.compress(json.dumps(ids).encode(), 9)).decode()
    return {**ENV, "PARITY_SUITE_PER_TEST": str(PER_TEST), "PARITY_SUITE_DONE": packed}


def resume(run_pass: Callable[[Sequence[str]], ModuleRun]) -> ModuleRun:
    """``run_pass(done)`` until it does not stop in a test (at most ``MAX_HANGS`` times
    again): the test it stopped in is ``hang`` (or ``crash``) and the next pass leaves out
    every test with an outcome, so one hung test does not cost its module the rest."""
    run = first = run_pass(())
    tests, seconds, resumed = dict(run.tests), run.seconds, 0
    while run.stopped_in is not None and run.status != "0" and resumed < MAX_HANGS:
        tests[run.stopped_in] = Outcome(
            "hang" if run.timed_out else "crash",
            f"no end in {PER_TEST:g} s" if run.timed_out else f"the run ended: {run.status}",
        )
        resumed += 1
        run = run_pass(list(tests))
        tests.update((name, outcome) for name, outcome in run.tests.items() if name not in tests)
        seconds += run.seconds
    return ModuleRun(
        first.setup,
        first.module,
        tests,
        run.status,
        seconds,
        tail=run.tail,
        stopped_in=run.stopped_in,
        resumed=resumed,
    )


def argv(module: str, timeout: float, match: Sequence[str] = ()) -> list[str]:
    command = ["python3", "-c", RUNNER, "-v", "-u", RESOURCES, "--timeout", str(int(timeout))]
    for pattern in match:
        command += ["-m", pattern]
    for pattern in IGNORED.get(module, ()):
        command += ["-i", pattern]
    return [*command, module]


def run_baseline(
    client: docker.DockerClient,
    module: str,
    timeout: float,
    match: Sequence[str] = (),
    runtime: str = "runc",
) -> ModuleRun:
    """``module`` in a plain ``docker run --user 65534:65534 --read-only --network none``.

    ``runtime="runsc"`` tells which differences gVisor makes alone: ``--runtime runsc
    --security-opt seccomp=unconfined`` (with ``--oci-seccomp``, runsc would apply Docker's
    default profile, under which, as runsc reads it, no thread can start: ``clone3`` fails with
    ``EPERM``; see ``runtimes/docker/seccomp.py``).
    """
    return resume(lambda done: _baseline_pass(client, module, timeout, match, runtime, done))


def _baseline_pass(
    client: docker.DockerClient,
    module: str,
    timeout: float,
    match: Sequence[str],
    runtime: str,
    done: Sequence[str],
) -> ModuleRun:
    name = f"parity-cpython-suite-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    container = client.containers.run(
        IMAGE,
        argv(module, timeout - 30, match),
        name=name,
        user="65534:65534",
        read_only=True,
        network_mode="none",
        init=True,
        runtime=runtime,
        security_opt=["seccomp=unconfined"] if runtime != "runc" else None,
        working_dir="/work",
        environment=environment(done),
        tmpfs={
            "/work": f"size={DISK},uid=65534,gid=65534,mode=0700,exec",
            "/tmp": f"size={DISK},mode=1777,exec",
        },
        labels={"parity_sandbox.bench": "cpython-suite"},
        detach=True,
    )
    try:
        try:
            status = str(container.wait(timeout=timeout)["StatusCode"])
        except (requests.exceptions.Timeout, urllib3.exceptions.ReadTimeoutError):
            container.kill()
            status = "timeout"
        stdout = container.logs(stdout=True, stderr=False).decode(errors="replace")
        stderr = container.logs(stdout=False, stderr=True).decode(errors="replace")
    finally:
        container.remove(force=True)
    setup = BASELINE if runtime == "runc" else f"plain {runtime}"
    return ended(setup, module, status, time.monotonic() - started, stdout, stderr)


def run_ours(
    executor: DockerExecutor,
    runtime: str,
    module: str,
    timeout: float,
    match: Sequence[str] = (),
) -> ModuleRun:
    """``module`` as a task of our executor under ``runtime``."""
    return resume(lambda done: _ours_pass(executor, runtime, module, timeout, match, done))


def _ours_pass(
    executor: DockerExecutor,
    runtime: str,
    module: str,
    timeout: float,
    match: Sequence[str],
    done: Sequence[str],
) -> ModuleRun:
    task = Task(
        image=IMAGE,
        command=argv(module, timeout - 30, match),
        env=environment(done),
        oci_runtime=runtime,
        limits={**LIMITS, "timeout": timeout},
    )
    started = time.monotonic()
    result: Result | None
    try:
        result = executor.execute(task)
        status = str(result.exit_code)
    except SandboxError as exc:
        result = exc.result
        status = result.limit or result.status if result is not None else type(exc).__name__
    stdout = result.stdout.decode(errors="replace") if result is not None else ""
    stderr = result.stderr.decode(errors="replace") if result is not None else ""
    return ended(runtime, module, status, time.monotonic() - started, stdout, stderr)


@dataclass
class Difference:
    test: str
    baseline: Outcome
    ours: Outcome
    #: Why (from ``KNOWN``), "flaky" (agreed when run again alone), or "" (unexplained).
    reason: str = ""


@dataclass
class Comparison:
    module: str
    runtime: str
    tests: int
    same: int
    differences: list[Difference] = field(default_factory=list)

    @property
    def unexplained(self) -> list[Difference]:
        return [d for d in self.differences if not d.reason]


def known_reason(runtime: str, test: str, known: Mapping[tuple[str, str], str] = KNOWN) -> str:
    for (where, pattern), why in known.items():
        if where in ("*", runtime) and fnmatch.fnmatchcase(test, pattern):
            return why
    return ""


def compare(base: ModuleRun, ours: ModuleRun) -> Comparison:
    """Test by test: which outcome kinds differ (a test one side never reported is
    ``missing`` there)."""
    missing = Outcome("missing")
    names = sorted(base.tests.keys() | ours.tests.keys())
    differences = [
        Difference(name, base.tests.get(name, missing), ours.tests.get(name, missing))
        for name in names
        if base.tests.get(name, missing).kind != ours.tests.get(name, missing).kind
    ]
    for difference in differences:
        difference.reason = known_reason(ours.setup, difference.test)
    return Comparison(
        base.module, ours.setup, len(names), len(names) - len(differences), differences
    )


def match_patterns(differences: Iterable[Difference]) -> list[str]:
    """regrtest ``-m`` patterns for the differing tests (setUpClass-style errors name their
    class or module: those match the whole of it)."""
    patterns = []
    for difference in differences:
        test = difference.test
        holder = re.fullmatch(r"\w+ \(([\w.]+)\)", test)  # "setUpClass (module.Class)"
        patterns.append(holder.group(1) if holder else test)
    return sorted(set(patterns))


def confirm(
    comparison: Comparison,
    rerun_base: ModuleRun,
    rerun_ours: ModuleRun,
    plain: ModuleRun | None = None,
) -> None:
    """Explain what can be explained of the unexplained differences, from runs of those
    tests alone: a difference that does not recur is flaky; one that a plain container of
    the same OCI runtime (``plain``) shows too is that runtime's own."""
    for difference in comparison.unexplained:
        again_base = rerun_base.tests.get(difference.test)
        again_ours = rerun_ours.tests.get(difference.test)
        if again_base is not None and again_ours is not None and again_base.kind == again_ours.kind:
            difference.reason = (
                f"flaky: alone, both {again_base.kind} (first run: baseline "
                f"{difference.baseline.kind}, ours {difference.ours.kind})"
            )
            continue
        in_plain = plain.tests.get(difference.test) if plain is not None else None
        if plain is not None and in_plain is not None and in_plain.kind == difference.ours.kind:
            difference.reason = (
                f"not ours: a plain {plain.setup.split()[-1]} container does the same"
            )


def short(outcome: Outcome) -> str:
    detail = " ".join(outcome.detail.split())
    return f"{outcome.kind} ({detail[:160]})" if detail else outcome.kind


def report(comparisons: Sequence[Comparison], runs: Mapping[tuple[str, str], ModuleRun]) -> str:
    """The table: per module and runtime, tests, same as the baseline, differences."""
    runtimes = sorted({c.runtime for c in comparisons}, key=["runc", "runsc"].index)
    lines = [
        "| module | tests | "
        + " | ".join(f"same ({r}) | differences ({r})" for r in runtimes)
        + " |",
        "| --- | ---: | " + " | ".join("---: | ---:" for _ in runtimes) + " |",
    ]
    by_module: dict[str, dict[str, Comparison]] = {}
    for comparison in comparisons:
        by_module.setdefault(comparison.module, {})[comparison.runtime] = comparison
    totals = {r: [0, 0, 0] for r in runtimes}
    for module, per in by_module.items():
        tests = max(c.tests for c in per.values())
        cells = []
        for runtime in runtimes:
            c = per.get(runtime)
            if c is None:
                cells.append("- | -")
                continue
            cells.append(f"{c.same} | {len(c.differences)}")
            totals[runtime][0] += c.tests
            totals[runtime][1] += c.same
            totals[runtime][2] += len(c.differences)
        lines.append(f"| {module} | {tests} | " + " | ".join(cells) + " |")
    lines.append(
        "| **total** | "
        + str(max(t[0] for t in totals.values()))
        + " | "
        + " | ".join(f"{t[1]} | {t[2]}" for t in totals.values())
        + " |"
    )
    lines.append("")
    lines.append("Differences (test: baseline -> ours, why):")
    for comparison in comparisons:
        for d in comparison.differences:
            why = d.reason or "UNEXPLAINED"
            lines.append(
                f"- [{comparison.runtime}] {d.test}: {short(d.baseline)} -> {short(d.ours)}; {why}"
            )
    lines.append("")
    lines.append("Module runs (exit status, seconds):")
    for (module, setup), run in runs.items():
        again = f", run again {run.resumed}x without the tests done" if run.resumed else ""
        lines.append(f"- {module} {setup}: status {run.status}, {run.seconds:.0f} s{again}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", help="comma-separated (default: all of MODULES)")
    parser.add_argument("--runtimes", default="runc,runsc", help="comma-separated")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per module run")
    parser.add_argument("--json", help="write every run's outcomes to this file")
    parser.add_argument("--no-confirm", action="store_true", help="do not re-run differences")
    args = parser.parse_args()
    modules = args.modules.split(",") if args.modules else list(MODULES)
    runtimes = args.runtimes.split(",")
    client = docker.from_env(timeout=int(args.timeout) + 60)
    try:
        try:
            client.images.get(IMAGE)
        except docker.errors.ImageNotFound:
            print(f"{IMAGE} is missing: run scripts/build-cpython-suite-image.sh", file=sys.stderr)
            return 2
        return run_all(args, client, modules, runtimes)
    finally:
        client.close()


def run_all(
    args: argparse.Namespace,
    client: docker.DockerClient,
    modules: Sequence[str],
    runtimes: Sequence[str],
) -> int:
    """Every module: the baseline, then ours under each runtime; the table; the status."""
    runs: dict[tuple[str, str], ModuleRun] = {}
    comparisons: list[Comparison] = []
    harness_errors: list[str] = []
    with DockerExecutor(Config(cache={"enabled": False})) as executor:
        for module in modules:
            base = runs[module, BASELINE] = run_baseline(client, module, args.timeout)
            print(
                f"{module} baseline: {len(base.tests)} tests, status {base.status}, "
                f"{base.seconds:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            if not base.tests:  # regrtest skipped it as a whole (status 0), or it failed
                if base.status != "0":
                    harness_errors.append(f"{module} baseline reported no test:\n{base.tail}")
                continue
            for runtime in runtimes:
                ours = runs[module, runtime] = run_ours(executor, runtime, module, args.timeout)
                comparison = compare(base, ours)
                print(
                    f"{module} {runtime}: {len(ours.tests)} tests, status {ours.status}, "
                    f"{ours.seconds:.0f} s, {len(comparison.differences)} differences"
                    + (f", run again {ours.resumed}x after a hang" if ours.resumed else ""),
                    file=sys.stderr,
                    flush=True,
                )
                # Not after a run that ran out of time (its tests would again), nor for hundreds.
                finished = (
                    ours.stopped_in is None and ours.status.isdigit() and int(ours.status) < 128
                )
                if (
                    comparison.unexplained
                    and finished
                    and len(comparison.unexplained) <= MAX_CONFIRM
                    and not args.no_confirm
                ):
                    patterns = match_patterns(comparison.unexplained)
                    plain = None
                    if runtime != "runc":
                        plain = run_baseline(client, module, args.timeout, patterns, runtime)
                    confirm(
                        comparison,
                        run_baseline(client, module, args.timeout, patterns),
                        run_ours(executor, runtime, module, args.timeout, patterns),
                        plain,
                    )
                comparisons.append(comparison)
            if args.json:
                save(args.json, comparisons, runs)
    print(report(comparisons, runs))
    for error in harness_errors:
        print(error, file=sys.stderr)
    return 1 if harness_errors else 0


def save(
    path: str, comparisons: Sequence[Comparison], runs: Mapping[tuple[str, str], ModuleRun]
) -> None:
    """Every run's outcomes, and every difference with its reason, as JSON."""
    document = {
        "runs": {
            f"{module} {setup}": {
                "status": run.status,
                "seconds": round(run.seconds, 1),
                "resumed": run.resumed,
                "tail": run.tail,
                "tests": {name: [o.kind, o.detail] for name, o in run.tests.items()},
            }
            for (module, setup), run in runs.items()
        },
        "comparisons": [
            {
                "module": c.module,
                "runtime": c.runtime,
                "tests": c.tests,
                "same": c.same,
                "differences": [
                    [d.test, short(d.baseline), short(d.ours), d.reason] for d in c.differences
                ],
            }
            for c in comparisons
        ],
    }
    with open(path, "w") as out:
        json.dump(document, out, indent=1)


if __name__ == "__main__":
    sys.exit(main())
