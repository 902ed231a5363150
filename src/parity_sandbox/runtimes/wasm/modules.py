"""Module files, read from the host once while unchanged (input files: ``_inputs``).

:class:`ModuleFiles` recognises an unchanged module file by inode, size and times, so it is
neither read nor hashed again; :func:`check_module` refuses what is not WebAssembly before any
worker sees it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import OrderedDict

from parity_sandbox._exceptions import InvalidInput
from parity_sandbox._fs import file_identity, read_host_file
from parity_sandbox._models import MAX_MODULE_BYTES, Task

WASM_MAGIC = b"\0asm\x01\0\0\0"


def check_module(module: bytes) -> str:
    """Check the header of a WASI preview 1 module and return its sha256."""
    if module[:4] != WASM_MAGIC[:4]:
        raise InvalidInput("wasm_file: not a WebAssembly module (no \\0asm header)", field="wasm")
    if module[:8] != WASM_MAGIC:
        raise InvalidInput(
            "wasm_file: a WebAssembly component or unknown version; only WASI preview 1 "
            "command modules are supported",
            field="wasm",
        )
    return hashlib.sha256(module).hexdigest()


class ModuleFiles:
    """Module files read recently, so that an unchanged file is neither re-read nor re-hashed."""

    def __init__(self, max_entries: int = 64) -> None:
        self._entries: OrderedDict[str, tuple[tuple[int, ...], bytes, str]] = OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()
        #: id(module) -> (the module, its sha256), for modules given as bytes: one object
        #: sent again and again (a service's stored module) is hashed once. The entry holds
        #: the object, so its id names no other while it is here.
        self._objects: OrderedDict[int, tuple[bytes, str]] = OrderedDict()

    def _checked(self, module: bytes) -> str:
        """``check_module(module)``, remembered for this very object."""
        with self._lock:
            known = self._objects.get(id(module))
            if known is not None and known[0] is module:
                self._objects.move_to_end(id(module))
                return known[1]
        sha = check_module(module)
        with self._lock:
            self._objects[id(module)] = (module, sha)
            while len(self._objects) > self._max_entries:
                self._objects.popitem(last=False)
        return sha

    def load(self, task: Task) -> tuple[bytes, str]:
        """The module of ``task`` and its sha256."""
        if task.wasm_file is None:
            assert task.wasm_module is not None
            return task.wasm_module, self._checked(task.wasm_module)
        name = os.fspath(task.wasm_file)
        with self._lock:
            cached = self._entries.get(name)
        if cached is not None:
            # One stat decides: the same identity means the same bytes as read before.
            with contextlib.suppress(OSError):
                if file_identity(task.wasm_file.stat()) == cached[0]:
                    return cached[1], cached[2]
        data, identity = read_host_file(task.wasm_file, "wasm_file", MAX_MODULE_BYTES)
        sha = check_module(data)
        with self._lock:
            self._entries[name] = (identity, data, sha)
            self._entries.move_to_end(name)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return data, sha
