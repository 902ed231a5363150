"""The attach-stream demultiplexer and the archive readers (pure: no Docker needed)."""

from __future__ import annotations

import io
import random
import tarfile

from parity_sandbox._fs import OutputCaps
from parity_sandbox.runtimes.docker.streams import (
    STDERR,
    STDOUT,
    Collected,
    Demux,
    input_archive,
    read_outputs,
)

SECRET = bytes(range(32))


def trailer(code: int, outputs: int = 0) -> bytes:
    """init's trailer of a command that started and exited with ``code``."""
    return SECRET + bytes([code, outputs, 0, 0])


def frame(stream: int, data: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data


def feed_in_random_pieces(demux: Demux, data: bytes, seed: int = 1) -> None:
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        size = rng.randint(1, 50)
        demux.feed(data[at : at + size])
        at += size


def test_frames_split_anywhere_are_demultiplexed() -> None:
    stream = frame(STDOUT, b"hello ") + frame(STDERR, b"oops") + frame(STDOUT, b"world")
    demux = Demux(cap=100)
    feed_in_random_pieces(demux, stream)
    assert demux.output(STDOUT) == (b"hello world", False)
    assert demux.output(STDERR) == (b"oops", False)
    assert demux.exit_code is None


def test_output_is_capped_and_flagged() -> None:
    demux = Demux(cap=10)
    for _ in range(1000):
        demux.feed(frame(STDOUT, b"x" * 1000))
    data, cut = demux.output(STDOUT)
    assert data == b"x" * 10 and cut
    assert len(demux.streams[STDOUT]) <= 10 + 36  # nothing kept past the cap and the trailer


def test_trailer_on_both_streams_ends_the_run_and_is_stripped() -> None:
    demux = Demux(cap=100, secret=SECRET)
    stream = frame(STDOUT, b"out") + frame(STDERR, b"err") + frame(STDOUT, trailer(7))
    feed_in_random_pieces(demux, stream)
    assert demux.exit_code is None  # stderr's trailer has not come yet
    demux.feed(frame(STDERR, trailer(7)))
    assert demux.exit_code == 7
    assert demux.output(STDOUT) == (b"out", False)
    assert demux.output(STDERR) == (b"err", False)


def test_a_command_that_never_started_is_told_apart_from_its_exit_code() -> None:
    demux = Demux(cap=100, secret=SECRET)
    failed = SECRET + bytes([127, 0, ord("x"), 2])  # exec failed with ENOENT
    demux.feed(frame(STDOUT, failed) + frame(STDERR, b"cannot run\n" + failed))
    assert demux.exit_code == 127
    assert demux.launch_failure == ("exec", 2)
    started = Demux(cap=100, secret=SECRET)
    started.feed(frame(STDOUT, trailer(127)) + frame(STDERR, trailer(127)))
    assert started.exit_code == 127 and started.launch_failure is None


def test_a_forged_trailer_does_not_end_the_run() -> None:
    demux = Demux(cap=100, secret=SECRET)
    fake = bytes(32) + b"\x00\x00\x00\x00"
    demux.feed(frame(STDOUT, fake) + frame(STDERR, fake))
    assert demux.exit_code is None


def test_trailer_after_a_capped_flood_keeps_the_truncation() -> None:
    demux = Demux(cap=5, secret=SECRET)
    demux.feed(frame(STDOUT, b"y" * 50 + trailer(0, 1)) + frame(STDERR, trailer(0, 1)))
    assert demux.exit_code == 0
    assert demux.output(STDOUT) == (b"yyyyy", True)
    exact = Demux(cap=5, secret=SECRET)
    exact.feed(frame(STDOUT, b"y" * 5 + trailer(0, 1)) + frame(STDERR, trailer(0, 1)))
    assert exact.output(STDOUT) == (b"yyyyy", False)


def tar_of(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def chunks(data: bytes, size: int = 7) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_only_regular_files_with_safe_names_are_kept() -> None:
    archive = tar_of(
        (member("out", tarfile.DIRTYPE), b""),
        (member("out/real.txt"), b"real"),
        (member("out/hard", tarfile.LNKTYPE, "out/real.txt"), b""),
        (member("out/passwd", tarfile.SYMTYPE, "/etc/passwd"), b""),
        (member("out/root", tarfile.SYMTYPE, "/"), b""),
        (member("out/fifo", tarfile.FIFOTYPE), b""),
        (member("out/dev", tarfile.CHRTYPE), b""),
        (member("../escape"), b"bad"),
        (member("/abs"), b"bad"),
        (member("out/../../up"), b"bad"),
        (member("out/bad\\name"), b"bad"),
        (member("out/unknown-hard", tarfile.LNKTYPE, "/etc/shadow"), b""),
    )
    collected = Collected(OutputCaps())
    read_outputs(chunks(archive), "out", collected)
    assert collected.files == {"out/real.txt": b"real", "out/hard": b"real"}
    assert not collected.truncated


def test_nested_output_paths_keep_their_parent() -> None:
    archive = tar_of((member("result.json"), b"{}"))
    collected = Collected(OutputCaps())
    read_outputs([archive], "deep/dir/result.json", collected)
    assert collected.files == {"deep/dir/result.json": b"{}"}


def test_caps_on_count_size_total_and_depth() -> None:
    files = [(member(f"out/f{i}"), b"x" * 10) for i in range(20)]
    collected = Collected(OutputCaps(max_files=5))
    read_outputs([tar_of(*files)], "out", collected)
    assert len(collected.files) == 5 and collected.truncated

    collected = Collected(OutputCaps(max_file_bytes=4))
    read_outputs(
        [tar_of((member("out/big"), b"12345"), (member("out/ok"), b"1234"))], "out", collected
    )
    assert collected.files == {"out/ok": b"1234"} and collected.truncated

    collected = Collected(OutputCaps(max_total_bytes=15))
    read_outputs([tar_of(*files)], "out", collected)
    assert collected.total <= 15 and collected.truncated

    deep = "out/" + "/".join(["d"] * 40) + "/f"
    collected = Collected(OutputCaps(max_depth=32))
    read_outputs([tar_of((member(deep), b"x"))], "out", collected)
    assert collected.files == {}


def test_a_garbage_or_endless_archive_is_bounded() -> None:
    collected = Collected(OutputCaps(max_total_bytes=1000, max_entries=1))
    read_outputs(iter(lambda: b"\xff" * 4096, None), "out", collected)
    assert collected.files == {} and collected.truncated


def test_input_archive_is_root_owned_and_read_only() -> None:
    data = input_archive({"a/b/c.txt": b"hello", "top.bin": b"\x00\x01"})
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        entries = {m.name: m for m in archive.getmembers()}
    assert set(entries) == {"a", "a/b", "a/b/c.txt", "top.bin"}
    assert all(m.uid == 0 and m.gid == 0 for m in entries.values())
    assert entries["a/b/c.txt"].mode == 0o444 and entries["a"].mode == 0o555
