"""Canonical encodings and hashes of what a task is and of what it produced.

Both hashes are SHA-256 over the UTF-8 bytes of a JSON document written canonically: keys
sorted, no whitespace (separators ``,`` and ``:``), non-ASCII characters as themselves, integers
as integers, numbers with a fraction as Python's shortest round-trip ``repr`` (which JSON
shares), and every byte string replaced by the hex SHA-256 of its bytes. Each document carries
``"v": 1``; a change of encoding will change ``v``.

**Spec hash** (``spec_hash(task, config)``, ``PreparedTask.spec_hash``): everything that
determines a task's output::

    {"v": 1, "kind": "task",
     "runtime": "wasm" | "docker" | another registered runtime's name,
     "program": {"module_sha256": HEX} | {"image_id": "sha256:HEX"},   # never a tag
     "args": [...],                   # wasm: arguments; docker: the command, or null (image's)
     "env": {NAME: VALUE},
     "stdin_sha256": HEX,
     "input_files": {NAME: HEX},      # the SHA-256 of each file's content
     "outputs": [PATH, ...],
     "limits": {NAME: NUMBER},        # resolved (defaults, configuration, task), as numbers:
                                      # the runtime's hashed_limits, set or not (wasm: memory,
                                      # disk, output, timeout, fuel, stack_size; docker: memory,
                                      # cpu, pids, disk, output, timeout), then the other
                                      # limits it applies, where set
     "deterministic": BOOL,
     ...}                             # the runtime's own fields (Executor._spec_fields); docker:
                                      # "docker": {"user", "workdir", "oci_runtime", "gpus"}

The document is made by ``Executor.spec_document`` of the task's runtime.

Limits are numbers after parsing, so ``"1g"`` and ``1073741824`` give the same hash; the task's
``id`` and ``labels`` do not determine the output and are left out.

**Result hash** (``Result.result_hash``)::

    {"v": 1, "kind": "result", "status": STATUS, "exit_code": INT | null,
     "stdout_sha256": HEX, "stderr_sha256": HEX,
     "stdout_truncated": BOOL, "stderr_truncated": BOOL,
     "files": {PATH: {"size": INT, "sha256": HEX}}, "files_truncated": BOOL}

Timing, resource usage, the runtime's version, the task's labels and the security events (which
carry times) are left out: two runs that printed and wrote the same things have the same result
hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

VERSION = 1


def sha256_hex(data: bytes) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def canonical(document: Mapping[str, Any]) -> bytes:
    """``document`` as canonical JSON bytes (see the module docstring)."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def digest(document: Mapping[str, Any]) -> str:
    """The hex SHA-256 of ``document``'s canonical encoding."""
    return sha256_hex(canonical(document))
