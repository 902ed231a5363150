"""The official WASI test suite as tasks: each test under plain wasmtime-py and in the sandbox.

    PYTHONPATH=src .venv/bin/python bench/wasi_testsuite.py SUITE_DIR [SUITE_DIR ...]
    e.g. SUITE_DIR = wasi-testsuite/tests/rust/testsuite/wasm32-wasip1 (a checkout of
    github.com/WebAssembly/wasi-testsuite, branch prod/testsuite-base)

For every ``NAME.wasm`` in a suite folder, with its spec ``NAME.json`` (none: the default):

- **plain**: wasmtime-py as the suite's own wasmtime adapter runs it (``argv`` = the file's
  name and the spec's ``args``, only the spec's ``env``, ``root`` preopened as ``/`` and each
  of ``dirs`` under its name, every fixture a fresh copy), in a child process of its own;
- **sandbox**: ``spec_task`` -> ``WasmExecutor.execute`` -> ``spec_failures``
  (``parity_sandbox.wasi_spec``), with the configured defaults.

It prints a row per test (a difference with its reason) and the totals; ``--json FILE`` keeps
the rows. A test the sandbox cannot express is a row with the ``InvalidInput`` message.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from parity_sandbox import InvalidInput, Result, SandboxError, WasmExecutor
from parity_sandbox.wasi_spec import read_spec, spec_failures, spec_task

#: What the wasmtime CLI reports for a trap on Unix (128 + SIGABRT).
TRAP_EXIT = 134


def plain_run(module: Path, scratch: Path) -> dict[str, Any]:
    """Run ``module`` as the suite's wasmtime adapter does (in this process: a child's)."""
    import wasmtime

    spec = read_spec(module)
    config = wasmtime.WasiConfig()
    config.argv = [module.name, *spec.get("args", ())]
    config.env = [[key, value] for key, value in spec.get("env", {}).items()]
    if "root" in spec:
        host = scratch / "root"
        shutil.copytree(module.parent / spec["root"], host, symlinks=True)
        config.preopen_dir(str(host), "/")
    for name in spec.get("dirs", ()):
        host = scratch / "dirs" / name
        shutil.copytree(module.parent / name, host, symlinks=True)
        config.preopen_dir(str(host), name)
    out, err = scratch / "stdout", scratch / "stderr"
    config.stdin_file = os.devnull
    config.stdout_file = str(out)
    config.stderr_file = str(err)
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    store.set_wasi(config)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    try:
        instance = linker.instantiate(store, wasmtime.Module.from_file(engine, str(module)))
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
        code = 0
    except wasmtime.ExitTrap as exc:
        code = exc.code
    except (wasmtime.Trap, wasmtime.WasmtimeError):
        code = TRAP_EXIT
    return {"exit_code": code, "stdout": out.read_bytes(), "stderr": err.read_bytes()}


def plain_failures(module: Path, timeout: float) -> list[str]:
    """How the plain run differs from the spec (its own process: a hang or crash is one row)."""
    try:
        child = subprocess.run(
            [sys.executable, __file__, "--plain", str(module)],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return [f"no end in {timeout:g} s"]
    if child.returncode != 0:
        return [f"runner failed: {child.stderr.decode(errors='replace')[-300:]}"]
    got = json.loads(child.stdout)
    spec = read_spec(module)
    failures = []
    if got["exit_code"] != spec.get("exit_code", 0):
        failures.append(f"exit code {got['exit_code']}, expected {spec.get('exit_code', 0)}")
    for stream in ("stdout", "stderr"):
        if stream in spec and got[stream] != spec[stream]:
            failures.append(f"{stream} differs")
    if failures and got["stderr"]:
        failures.append(got["stderr"].strip().splitlines()[-1][:200])
    return failures


def sandbox_failures(executor: WasmExecutor, module: Path) -> list[str]:
    try:
        spec = read_spec(module)
        result: Result = executor.execute(spec_task(spec, module))
    except InvalidInput as exc:
        return [f"cannot be expressed: {exc}"]
    except SandboxError as exc:  # a trap or a limit: the result is on the exception
        if exc.result is None:
            return [f"{type(exc).__name__}: {exc}"]
        result = exc.result
    failures = spec_failures(spec, result)
    if failures and result.stderr:
        failures.append(result.stderr.decode(errors="replace").strip().splitlines()[-1][:200])
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", type=Path)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        with tempfile.TemporaryDirectory(prefix="wasi-plain-") as scratch:
            got = plain_run(args.plain.resolve(), Path(scratch))
        got["stdout"] = got["stdout"].decode(errors="replace")
        got["stderr"] = got["stderr"].decode(errors="replace")
        print(json.dumps(got))
        return 0
    if not args.suites:
        parser.error("name at least one suite folder (tests/LANGUAGE/testsuite/wasm32-wasip1)")
    rows = []
    with WasmExecutor() as executor:
        for suite in args.suites:
            for module in sorted(suite.resolve().glob("*.wasm")):
                plain = plain_failures(module, args.timeout)
                ours = sandbox_failures(executor, module)
                rows.append(
                    {
                        "suite": suite.parent.parent.name,
                        "test": module.stem,
                        "plain": plain,
                        "sandbox": ours,
                    }
                )
    print("| suite | test | plain wasmtime | sandbox | why they differ |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        why = (
            "; ".join(row["sandbox"] or row["plain"])
            if bool(row["plain"]) != bool(row["sandbox"])
            else ""
        )
        print(
            f"| {row['suite']} | {row['test']} | {'fail' if row['plain'] else 'pass'} "
            f"| {'fail' if row['sandbox'] else 'pass'} | {why} |"
        )
    passed_plain = [row for row in rows if not row["plain"]]
    both = [row for row in passed_plain if not row["sandbox"]]
    print(
        f"\n{len(rows)} tests: {len(passed_plain)} pass under plain wasmtime; of those, "
        f"{len(both)} pass in the sandbox; {sum(not row['sandbox'] for row in rows)} pass in "
        "the sandbox in all."
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
