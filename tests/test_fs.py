"""Host-side handling of task-made trees: links, FIFOs, depth, width."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from parity_sandbox._fs import OutputCaps, collect_outputs, remove_tree, write_files


def deep_chain(root: Path, depth: int) -> Path:
    """Make root/d/d/.../d (``depth`` levels) with relative paths, beyond PATH_MAX."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("bottom.txt", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "wb") as f:
            f.write(b"deep")
    finally:
        os.close(fd)
    return root


def test_links_fifos_and_devices_are_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (out / "ok.txt").write_text("fine")
    (out / "link").symlink_to(secret)
    (out / "dirlink").symlink_to(tmp_path)
    os.mkfifo(out / "fifo")
    (out / "dev").symlink_to("/dev/zero")
    (tmp_path / "work" / "outlink").symlink_to(tmp_path)

    done: dict[str, tuple[dict[str, bytes], bool]] = {}
    thread = threading.Thread(
        target=lambda: done.update(r=collect_outputs(tmp_path / "work", ("out", "outlink")))
    )
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "collection hung on a FIFO"
    files, truncated = done["r"]
    assert files == {"out/ok.txt": b"fine"}
    assert truncated is False


def test_a_symlinked_output_root_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.txt").write_text("outside")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "out").symlink_to(tmp_path / "elsewhere")
    assert collect_outputs(tmp_path / "work", ("out", "out/x.txt")) == ({}, False)


def test_caps_on_count_size_and_depth(tmp_path: Path) -> None:
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    for i in range(30):
        (out / f"f{i:02}").write_bytes(b"x" * 100)
    (out / "big").write_bytes(b"y" * 5000)
    deep_chain(out, 50)
    files, truncated = collect_outputs(
        tmp_path / "work",
        ("out",),
        OutputCaps(max_files=10, max_file_bytes=1000, max_total_bytes=10_000, max_depth=8),
    )
    assert truncated
    assert len(files) == 10
    assert "out/big" not in files
    files, truncated = collect_outputs(
        tmp_path / "work", ("out",), OutputCaps(max_files=100, max_file_bytes=1000, max_depth=8)
    )
    assert truncated  # "big" is over the per-file cap
    assert not any(name.endswith("bottom.txt") for name in files)  # deeper than max_depth


def test_remove_tree_handles_depth_beyond_path_max(tmp_path: Path) -> None:
    root = tmp_path / "victim"
    root.mkdir()
    deep_chain(root, 1500)
    remove_tree(root)
    assert not root.exists()


def test_remove_tree_never_follows_links(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("keep me")
    root = tmp_path / "victim"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "link").symlink_to(keep)
    (root / "filelink").symlink_to(keep / "precious.txt")
    remove_tree(root)
    assert not root.exists()
    assert (keep / "precious.txt").read_text() == "keep me"
    link = tmp_path / "top-link"
    link.symlink_to(keep)
    remove_tree(link)
    assert not link.exists() and (keep / "precious.txt").exists()


def test_write_files_refuses_to_follow_or_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (target / "out").symlink_to(outside)
    with pytest.raises(OSError):
        write_files(target, {"out/x.txt": b"data"})
    assert list(outside.iterdir()) == []
    write_files(target, {"a/b.txt": b"1"})
    with pytest.raises(FileExistsError):
        write_files(target, {"a/b.txt": b"2"})
    assert (target / "a" / "b.txt").read_bytes() == b"1"
