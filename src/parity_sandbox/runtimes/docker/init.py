"""``parity-init``, process 1 of every container: built from C and added to a derived image.

Tasks run on an image derived from theirs that holds one more file, ``/.parity/init`` (a static
binary, about 700 KB). It is built with the host's C compiler the first time an image is used,
and the derived image is tagged by the base image's id and the helper source's hash, so each
(image, helper) pair is built once per Docker host. See ``init.c`` for what it does.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
from importlib import resources
from pathlib import Path

from parity_sandbox._exceptions import RuntimeUnavailable
from parity_sandbox.runtimes.docker.spec import INIT_PATH

#: The repository of derived images.
REPOSITORY = "parity-sandbox-init"
_CFLAGS = ("-static", "-Os", "-s", "-Wall")


def source() -> bytes:
    """The C source of the helper."""
    return resources.files("parity_sandbox.runtimes.docker").joinpath("init.c").read_bytes()


def source_digest() -> str:
    """What identifies a build of the helper: its source, flags and the machine."""
    digest = hashlib.sha256(source())
    digest.update(" ".join((*_CFLAGS, platform.machine())).encode())
    return digest.hexdigest()


def derived_tag(image_id: str) -> str:
    """The tag of the image derived from ``image_id`` with this build of the helper."""
    key = hashlib.sha256(f"{image_id}\n{source_digest()}".encode()).hexdigest()[:24]
    return f"{REPOSITORY}:{key}"


def build() -> bytes:
    """Compile the helper as a static binary and return it.

    Raises:
        RuntimeUnavailable: no C compiler, or no static C library, on this host.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeUnavailable(
            "the Docker runtime builds its container helper with a C compiler, and none is "
            "installed; install one (Debian: apt-get install gcc libc6-dev)"
        )
    with tempfile.TemporaryDirectory(prefix="parity-sandbox-init-") as work:
        src = Path(work) / "init.c"
        out = Path(work) / "init"
        src.write_bytes(source())
        try:
            done = subprocess.run(
                [compiler, *_CFLAGS, "-o", str(out), str(src)],
                capture_output=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeUnavailable(f"cannot build the container helper: {exc}") from exc
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise RuntimeUnavailable(
                f"cannot build the container helper with {compiler}: {detail[0]}; a static C "
                "library is needed (Debian: apt-get install libc6-dev)"
            )
        return out.read_bytes()


def helper_archive(binary: bytes) -> bytes:
    """A tar that adds ``/.parity/init`` (root-owned, mode 0755) at the root of an image."""
    directory, name = INIT_PATH.rsplit("/", 1)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        entry = tarfile.TarInfo(directory.lstrip("/"))
        entry.type, entry.mode = tarfile.DIRTYPE, 0o755
        archive.addfile(entry)
        entry = tarfile.TarInfo(f"{directory.lstrip('/')}/{name}")
        entry.mode, entry.size = 0o755, len(binary)
        archive.addfile(entry, io.BytesIO(binary))
    return buffer.getvalue()
