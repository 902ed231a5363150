"""Build the Docker test image ``parity-sandbox-test/busybox:latest`` unless it is current.

The image is a root filesystem made here from Debian's busybox-static plus the static test
probe (``tests/fixtures/docker/probe.c``), imported with ``parity-sandbox image import``: no
registry is needed. A label records a hash of its inputs, so a change rebuilds it.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import docker
import docker.errors

IMAGE = "parity-sandbox-test/busybox:latest"
ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "fixtures" / "docker" / "probe.c"
BUSYBOX = Path("/bin/busybox")
HASH_LABEL = "parity_sandbox.test.inputs"


def inputs_hash() -> str:
    digest = hashlib.sha256()
    for path in (BUSYBOX, PROBE, Path(__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def add(
    archive: tarfile.TarFile, name: str, kind: bytes, mode: int, data: bytes = b"", link: str = ""
) -> None:
    entry = tarfile.TarInfo(name)
    entry.type, entry.mode, entry.linkname, entry.size = kind, mode, link, len(data)
    archive.addfile(entry, io.BytesIO(data) if data else None)


def rootfs(probe: bytes) -> bytes:
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, check=True, text=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for directory in (
            "bin",
            "etc",
            "usr",
            "usr/local",
            "usr/local/bin",
            "work",
            "tmp",
            "input",
        ):
            add(archive, directory, tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755)
        add(archive, "bin/busybox", tarfile.REGTYPE, 0o755, BUSYBOX.read_bytes())
        for applet in applets.stdout.split():
            if applet != "busybox":
                add(archive, f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add(archive, "usr/local/bin/probe", tarfile.REGTYPE, 0o755, probe)
        passwd = (
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
        )
        add(archive, "etc/passwd", tarfile.REGTYPE, 0o644, passwd)
        add(archive, "etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\nnogroup:x:65534:\n")
    return buffer.getvalue()


def main() -> int:
    wanted = inputs_hash()
    client = docker.from_env()
    try:
        labels = client.images.get(IMAGE).labels or {}
        if labels.get(HASH_LABEL) == wanted:
            return 0
    except docker.errors.ImageNotFound:
        pass
    with tempfile.TemporaryDirectory() as work:
        probe = Path(work) / "probe"
        subprocess.run(["gcc", "-static", "-O2", "-o", str(probe), str(PROBE)], check=True)
        tar = Path(work) / "rootfs.tar"
        tar.write_bytes(rootfs(probe.read_bytes()))
        cli = shutil.which("parity-sandbox", path=str(Path(sys.executable).parent))
        assert cli is not None
        subprocess.run(
            [cli, "image", "import", str(tar), IMAGE, "--label", f"{HASH_LABEL}={wanted}"],
            check=True,
        )
    print(f"build_test_image: built {IMAGE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
