"""What the WASM executor and its worker processes say to each other, and the pure limit mapping.

Messages travel as ``marshal``-encoded tuples of plain values, never as pickles: a worker runs
untrusted code, and unpickling what it sends could run code in the parent; marshal builds plain
values only, and the parent validates every reply again when it builds the ``Result``.
(``marshal`` is also several times faster here.) Kept free of heavy imports: the parent does not
load wasmtime, the worker does not load pydantic.
"""

from __future__ import annotations

import functools
import marshal
from dataclasses import dataclass, field, fields
from typing import Any

from parity_sandbox._fs import OutputCaps

#: wasm32 linear memory cannot grow past 4 GiB.
MAX_WASM_MEMORY = 4 << 30

# Layout of the buffer a worker shares with the parent (a sparse memfd both map): two
# little-endian u64 counters of output bytes kept so far; at START_SLOT the seq (u64) and
# CLOCK_MONOTONIC time (f64) at which the worker last started a guest; at VIOLATION_SLOT the
# seq (u64) of a request whose workspace outgrew the disk cap while it ran (the worker then
# kills itself); then one region per stream of the largest cap + 1. Seqs start at 1.
START_SLOT = 16
START_FORMAT = "<Qd"
VIOLATION_SLOT = 32
#: Entries a workspace may hold; the walk that measures it stops there.
MAX_WORKSPACE_ENTRIES = 100_000
OUTPUT_HEADER = 4096
OUTPUT_REGION = (1 << 30) + 4096
OUTPUT_BUFFER_SIZE = OUTPUT_HEADER + 2 * OUTPUT_REGION


def output_slot(stream: int) -> tuple[int, int]:
    """Offsets of the counter and of the region of stream 0 (stdout) or 1 (stderr)."""
    return 8 * stream, OUTPUT_HEADER + stream * OUTPUT_REGION


@dataclass(frozen=True)
class WasmLimits:
    """The limits a worker enforces on one run, as plain numbers (bytes, seconds, units)."""

    memory: int
    timeout: float
    stack_size: int
    disk: int
    output: int
    fuel: int | None = None
    #: Deterministic mode: canonical NaNs, and clocks and randomness from the request's seed.
    deterministic: bool = False
    #: The largest file the guest may write; ``None``: the disk cap.
    file_size: int | None = None

    @property
    def engine_key(self) -> tuple[int, bool, bool]:
        """Engine settings that differ between tasks: one engine (and module cache) per key."""
        return (self.stack_size, self.fuel is not None, self.deterministic)


@dataclass(frozen=True)
class StoreSettings:
    """How :class:`WasmLimits` map onto a wasmtime engine and store."""

    max_wasm_stack: int
    consume_fuel: bool
    deterministic: bool
    memory_size: int
    fuel: int | None
    #: Soft ``RLIMIT_FSIZE`` of the worker while the guest runs: no file grows past the disk cap.
    file_size_limit: int
    table_elements: int = 1_000_000
    instances: int = 4
    tables: int = 4
    memories: int = 1


def store_settings(limits: WasmLimits) -> StoreSettings:
    """Translate limits to wasmtime settings; pure, so it is tested without wasmtime."""
    return StoreSettings(
        max_wasm_stack=limits.stack_size,
        consume_fuel=limits.fuel is not None,
        deterministic=limits.deterministic,
        memory_size=limits.memory,
        fuel=limits.fuel,
        file_size_limit=limits.disk if limits.file_size is None else limits.file_size,
    )


# Messages are built once per task on both sides: plain slotted dataclasses are several times
# cheaper to make than frozen ones; no code changes them after they are made.
@dataclass(slots=True)
class RunRequest:
    """Run one module once. ``module`` is ``None`` when the worker is believed to hold it."""

    seq: int
    module_sha256: str
    module: bytes | None
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    stdin: bytes
    input_files: dict[str, bytes]
    outputs: tuple[str, ...]
    limits: WasmLimits
    output_caps: OutputCaps = field(default_factory=OutputCaps)
    #: Deterministic mode: where the guest's clocks and random bytes come from (32 bytes).
    seed: bytes | None = None
    #: A reactor's entry point (``_initialize`` runs first, if exported) and the export that
    #: takes its result (``None``: run ``_start``).
    entry: str | None = None
    entry_exit: str | None = None
    #: The guest's working directory, under ``/work`` (``None``: ``/work``).
    workdir: str | None = None
    #: Trees of ``input_files`` mounted read-only elsewhere: (guest path, folder).
    mounts: tuple[tuple[str, str], ...] = ()
    #: The parent's own bookkeeping (the task's spec hash, for its result); never sent.
    spec_hash: str | None = None


@dataclass(frozen=True)
class Ready:
    """Sent by a worker once, when it has started."""

    wasmtime_version: str


@dataclass(frozen=True)
class NeedModule:
    """Sent by a worker asked to run a module it does not hold; the parent resends the bytes."""

    seq: int


@dataclass(slots=True)
class RunReply:
    """How one run ended.

    ``outcome`` is one of ``exit`` (see ``exit_code``), ``timeout``, ``limit`` (see ``limit``),
    ``trap`` (the guest crashed), ``invalid`` (the module was rejected) or ``error`` (the worker
    failed; a bug or a host problem; ``lost``: the worker died under the task).
    """

    seq: int
    outcome: str
    exit_code: int | None = None
    limit: str | None = None
    message: str = ""
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    files_truncated: bool = False
    duration: float = 0.0
    cpu_time: float | None = None
    peak_memory: int | None = None
    fuel_used: int | None = None
    #: Output entries that were not regular files (symlinks, FIFOs, ...), left out: how
    #: many, and the first few as ``(path, kind)``.
    not_followed: int = 0
    not_followed_paths: tuple[tuple[str, str], ...] = ()
    #: Set by the parent: the worker died under the task (not at a deadline or a cap).
    lost: bool = False


Message = RunRequest | RunReply | Ready | NeedModule

_REPLY_FIELDS = tuple(f.name for f in fields(RunReply))


def encode(message: Message) -> bytes:
    """The bytes of ``message`` on the wire."""
    if isinstance(message, RunRequest):
        limits, caps = message.limits, message.output_caps
        return marshal.dumps(
            (
                "run",
                message.seq,
                message.module_sha256,
                message.module,
                message.argv,
                message.env,
                message.stdin,
                message.input_files,
                message.outputs,
                (
                    limits.memory,
                    limits.timeout,
                    limits.stack_size,
                    limits.disk,
                    limits.output,
                    limits.fuel,
                    limits.deterministic,
                    limits.file_size,
                ),
                (
                    caps.max_files,
                    caps.max_file_bytes,
                    caps.max_total_bytes,
                    caps.max_depth,
                    caps.max_entries,
                ),
                message.seed,
                message.entry,
                message.entry_exit,
                message.workdir,
                message.mounts,
            )
        )
    if isinstance(message, RunReply):
        return marshal.dumps(("reply", *(getattr(message, name) for name in _REPLY_FIELDS)))
    if isinstance(message, Ready):
        return marshal.dumps(("ready", message.wasmtime_version))
    return marshal.dumps(("need", message.seq))


@functools.lru_cache(maxsize=64)
def _limits(values: tuple[Any, ...]) -> WasmLimits:
    # Tasks mostly share a few limit sets: make each (immutable) value object once.
    return WasmLimits(*values)


@functools.lru_cache(maxsize=8)
def _caps(values: tuple[Any, ...]) -> OutputCaps:
    return OutputCaps(*values)


def decode(data: bytes) -> Message:
    """The message in ``data``; raises ``ValueError`` for anything malformed."""
    try:
        # Not a pickle: marshal builds plain values only and runs no code.
        item = marshal.loads(data)  # noqa: S302
        kind = item[0]
        if kind == "run":
            return RunRequest(
                seq=item[1],
                module_sha256=item[2],
                module=item[3],
                argv=item[4],
                env=item[5],
                stdin=item[6],
                input_files=item[7],
                outputs=item[8],
                limits=_limits(tuple(item[9])),
                output_caps=_caps(tuple(item[10])),
                seed=item[11],
                entry=item[12],
                entry_exit=item[13],
                workdir=item[14],
                mounts=tuple(tuple(pair) for pair in item[15]),
            )
        if kind == "reply":
            return RunReply(*item[1:])
        if kind == "ready":
            return Ready(str(item[1]))
        if kind == "need":
            return NeedModule(int(item[1]))
    except (EOFError, TypeError, IndexError, KeyError) as exc:
        raise ValueError(f"malformed message: {exc}") from None
    raise ValueError(f"unknown message kind {kind!r}")
