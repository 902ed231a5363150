"""The audit log: a hash chain that any edit, removal or reordering breaks at the right entry,
that survives a writer killed mid-write, rotation, threads and processes."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import WasmFixtures
from parity_sandbox import (
    AuditLog,
    Config,
    InvalidInput,
    Limits,
    Task,
    WasmExecutor,
    load_config,
    verify_chain,
)
from parity_sandbox.audit import GENESIS, rotated_files
from parity_sandbox.cli import app

SRC = Path(__file__).resolve().parent.parent / "src"


def write(path: Path, count: int, **options: object) -> None:
    with AuditLog(path, **options) as log:  # type: ignore[arg-type]
        for index in range(count):
            log.record("test", index=index, label="tab\there \u2028 \x1b[2J")


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def all_files(path: Path) -> list[Path]:
    return [*rotated_files(path), path]


def test_a_fresh_log_verifies(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(log, 5)
    check = verify_chain([log])
    assert check.ok and check.entries == 5 and check.torn is None
    entries = [json.loads(line) for line in lines(log)]
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(entries))
    assert check.head == entries[-1]["hash"]
    # one line per entry, ASCII only, whatever the fields hold
    assert all(line.isascii() and line.count(b"\n") == 1 for line in lines(log))
    assert oct(log.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("target", [0, 3, 6])
def test_an_edited_entry_is_found_where_it_is(tmp_path: Path, target: int) -> None:
    log = tmp_path / "audit.log"
    write(log, 7)
    content = lines(log)
    content[target] = content[target].replace(b'"index":', b'"index":1')
    log.write_bytes(b"".join(content))
    check = verify_chain([log])
    assert check.broken is not None
    assert (check.broken.file, check.broken.line) == (log, target + 1)
    assert "changed" in check.broken.reason
    assert check.entries == target


def test_an_edit_with_its_hash_recomputed_breaks_the_next_link(tmp_path: Path) -> None:
    from parity_sandbox.audit import canonical, entry_hash

    log = tmp_path / "audit.log"
    write(log, 5)
    content = lines(log)
    entry = json.loads(content[2])
    entry["index"] = 99
    entry["hash"] = entry_hash(entry)
    content[2] = canonical(entry) + b"\n"
    log.write_bytes(b"".join(content))
    check = verify_chain([log])
    assert check.broken is not None and check.broken.line == 4
    assert "does not follow" in check.broken.reason


@pytest.mark.parametrize("target", [0, 2, 5])
def test_a_deleted_entry_is_found_where_it_was(tmp_path: Path, target: int) -> None:
    log = tmp_path / "audit.log"
    write(log, 7)
    content = lines(log)
    del content[target]
    log.write_bytes(b"".join(content))
    check = verify_chain([log])
    assert check.broken is not None and check.broken.line == target + 1
    assert check.entries == target


def test_a_deleted_last_entry_needs_the_head_noted_elsewhere(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(log, 4)
    head = verify_chain([log]).head
    assert head is not None
    log.write_bytes(b"".join(lines(log)[:-1]))
    assert verify_chain([log]).ok  # a chain alone cannot tell that its end is gone
    check = verify_chain([log], head=head)
    assert check.broken is not None and "cut" in check.broken.reason


@pytest.mark.parametrize("target", [0, 3])
def test_reordered_entries_are_found(tmp_path: Path, target: int) -> None:
    log = tmp_path / "audit.log"
    write(log, 6)
    content = lines(log)
    content[target], content[target + 1] = content[target + 1], content[target]
    log.write_bytes(b"".join(content))
    check = verify_chain([log])
    assert check.broken is not None and check.broken.line == target + 1


def test_an_inserted_line_is_found(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(log, 4)
    content = lines(log)
    content.insert(2, content[1])
    log.write_bytes(b"".join(content))
    check = verify_chain([log])
    assert check.broken is not None and check.broken.line == 3


def test_the_cli_names_the_broken_entry(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(log, 3)
    runner = CliRunner()
    good = runner.invoke(app, ["audit", "verify", str(log)])
    assert good.exit_code == 0 and good.stdout.startswith("ok 3 entries"), good.output
    content = lines(log)
    log.write_bytes(content[0] + content[2])
    bad = runner.invoke(app, ["audit", "verify", str(log)])
    assert bad.exit_code == 1
    assert f"BROKEN {log}:2:" in bad.stdout


def test_tail_prints_the_last_entries_escaped(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(log, 5)
    with log.open("ab") as handle:
        handle.write(b"\x1b[31mjunk\n")
    result = CliRunner().invoke(app, ["audit", "tail", str(log), "-n", "2"])
    assert result.exit_code == 0, result.output
    shown = result.stdout.splitlines()
    assert len(shown) == 2
    assert json.loads(shown[0])["index"] == 4
    assert "\x1b" not in result.stdout and "\\x1b" in shown[1]


def test_tail_follows_across_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(log, 1)
    follower = subprocess.Popen(
        [sys.executable, "-m", "parity_sandbox.cli", "audit", "tail", str(log), "-f"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    try:
        time.sleep(1.5)
        write(log, 40, rotate_bytes=4096)
        assert rotated_files(log), "the log did not rotate"
        time.sleep(1.5)
    finally:
        follower.send_signal(signal.SIGINT)
        out, _ = follower.communicate(timeout=10)
    seqs = [json.loads(line)["seq"] for line in out.splitlines()]
    assert seqs[0] == 0
    assert seqs[-1] == 40  # the last entry, written to the file after the rotation


def run_writer(path: Path, count: int, *, rotate: int | None = None) -> subprocess.Popen[bytes]:
    script = textwrap.dedent(
        f"""
        from parity_sandbox import AuditLog
        with AuditLog({str(path)!r}, rotate_bytes={rotate!r}) as log:
            for i in range({count}):
                log.record("test", index=i, pad="x" * 200)
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(SRC)}
    )


def test_a_writer_killed_mid_log_leaves_it_verifiable(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    writer = run_writer(log, 10**9)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not log.exists() or log.stat().st_size < 50_000):
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    check = verify_chain([log])
    assert check.ok, check.broken
    assert check.entries > 100
    # The next writer goes on from the last whole entry (cutting a torn line, if one was left).
    write(log, 2)
    after = verify_chain([log])
    assert after.ok and after.torn is None
    assert after.entries in (check.entries + 2, check.entries + 3)


def test_a_torn_last_line_is_cut_and_the_repair_logged(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(log, 3)
    whole = log.read_bytes()
    log.write_bytes(whole + b'{"action":"test","ind')
    check = verify_chain([log])
    assert check.ok and check.entries == 3 and check.torn == (log, 4)
    write(log, 1)
    entries = [json.loads(line) for line in lines(log)]
    assert [e["action"] for e in entries] == ["test"] * 3 + ["log_repaired", "test"]
    assert entries[3]["dropped_bytes"] == len(b'{"action":"test","ind')
    assert verify_chain([log]).entries == 5


def test_rotation_keeps_the_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(log, 50, rotate_bytes=2048)
    files = all_files(log)
    assert len(files) > 3
    check = verify_chain(files)
    assert check.ok and check.entries == 50, check.broken
    # A rotated file is named for its last entry, and the next file goes on from it.
    first = files[0]
    last_seq = json.loads(lines(first)[-1])["seq"]
    assert first.name == f"audit.log.{last_seq:012d}"
    assert json.loads(lines(files[1])[0])["seq"] == last_seq + 1
    # Without its first file the chain does not start at the beginning...
    missing = verify_chain(files[1:])
    assert missing.broken is not None and missing.broken.file == files[1]
    # ...unless the hash it continues from is given.
    assert verify_chain(files[1:], after=json.loads(lines(first)[-1])["hash"]).ok
    # Files out of order break it.
    swapped = verify_chain([files[1], files[0], *files[2:]], after=GENESIS)
    assert not swapped.ok


def test_threads_share_one_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with AuditLog(log, fsync="batch", rotate_bytes=16384) as shared:

        def work(worker: int) -> None:
            for index in range(100):
                shared.record("test", worker=worker, index=index)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    check = verify_chain(all_files(log))
    assert check.ok and check.entries == 800, check.broken


def test_processes_share_one_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    writers = [run_writer(log, 300, rotate=32768) for _ in range(2)]
    for writer in writers:
        assert writer.wait(120) == 0
    files = all_files(log)
    assert len(files) > 1
    check = verify_chain(files)
    assert check.ok and check.entries == 600, check.broken


def test_reserved_keys_are_refused(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.log") as log, pytest.raises(ValueError, match="reserved"):
        log.record("test", prev="0" * 64)


def test_the_log_is_not_followed_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "audit.log").symlink_to(target)
    with AuditLog(tmp_path / "audit.log") as log, pytest.raises(Exception, match="audit log"):
        log.record("test")
    assert target.read_text() == ""


def test_the_stdout_sink_carries_the_same_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.log"
    with AuditLog(log, sink="stdout") as audit:
        audit.record("key_created", who="admin", key_id="k1")
    assert capsys.readouterr().out.encode() == log.read_bytes()


def test_configuration_section_and_environment(tmp_path: Path) -> None:
    config = load_config(
        environ={
            "PARITY_SANDBOX_AUDIT_PATH": str(tmp_path / "a.log"),
            "PARITY_SANDBOX_AUDIT_FSYNC": "batch",
            "PARITY_SANDBOX_AUDIT_ROTATE_BYTES": "10m",
        }
    )
    assert config.audit.path == tmp_path / "a.log"
    assert config.audit.fsync == "batch" and config.audit.rotate_bytes == 10 << 20
    assert config.audit.enabled and not Config().audit.enabled
    assert config.to_document()["sandbox"]["audit"]["fsync"] == "batch"
    with pytest.raises(InvalidInput, match=r"audit\.fsync"):
        load_config(environ={"PARITY_SANDBOX_AUDIT_FSYNC": "never"})


def test_an_executor_writes_one_entry_per_task_end(
    tmp_path: Path, wasm: WasmFixtures, cache_dir: Path
) -> None:
    log = tmp_path / "audit.log"
    config = Config(
        cache_dir=cache_dir,
        timeout="10s",
        cache={"enabled": True, "path": tmp_path / "cache.sqlite3"},
        audit={"path": log},
    )
    with WasmExecutor(config, workers=1) as executor:
        hello = executor.prepare(Task(wasm_file=wasm.hello, deterministic=True), principal="key-7")
        first = executor.execute(hello)
        cached = executor.execute(hello)
        results = list(
            executor.map(
                [
                    Task(wasm_file=wasm.trap),
                    Task(wasm_file=wasm.hello, limits=Limits(memory="8g")),
                ]
            )
        )
    assert cached.cached
    # A leftover of another process that the executor reaped on the way is not one of these.
    written = [json.loads(line) for line in lines(log)]
    entries = [e for e in written if e["action"] != "leftover_reaped"]
    assert [e["action"] for e in entries] == ["task_end", "task_end", "task_rejected", "task_end"]
    run, hit, rejected, trapped = entries
    assert run["who"] == "key-7" and hit["who"] == "key-7" and trapped["who"] is None
    assert run["spec_hash"] == hello.spec_hash
    assert run["program"] == {"module_sha256": hello.program}
    assert run["result_hash"] == first.result_hash and run["status"] == "succeeded"
    assert run["limits"]["memory"] == hello.limits.memory
    assert run["usage"]["wall_time"] == first.usage.wall_time
    assert (run["cached"], hit["cached"]) == (False, True)
    assert rejected["field"] == "memory"
    assert trapped["status"] == "error" and trapped["result_hash"] == results[0].result_hash
    assert [e["kind"] for e in trapped["events"]] == ["guest_trap"]
    assert verify_chain([log]).entries == len(written)


def test_a_background_log_writes_in_order_off_the_callers_thread(
    wasm: WasmFixtures, tmp_path: Path
) -> None:
    """The service's log: task ends and ``record_later`` entries go to a writer thread, in the
    order they came; ``flush`` waits for them, and the chain holds."""
    path = tmp_path / "audit.log"
    log = AuditLog(path, fsync="batch", background=True)
    callers: set[str] = set()
    original = log.record

    def record(action: str, **fields: object) -> dict[str, object]:
        callers.add(threading.current_thread().name)
        return original(action, **fields)

    log.record = record  # type: ignore[method-assign]
    with WasmExecutor(Config(cache_dir=tmp_path), workers=1, audit=log) as executor:
        for index in range(5):
            log.record_later("marker", index=index)
            executor.execute(executor.prepare(Task(wasm_file=wasm.hello), principal=f"k{index}"))
    log.flush()
    entries = [json.loads(line) for line in lines(path)]
    assert [(e["action"], e.get("index", e.get("who"))) for e in entries] == [
        pair for index in range(5) for pair in (("marker", index), ("task_end", f"k{index}"))
    ]
    assert callers == {"parity-sandbox-audit"}
    log.close()
    assert verify_chain([path]).ok
