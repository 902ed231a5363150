"""A seccomp deny-list for processes that run untrusted code in-process (the WASM workers).

Defence in depth: should a guest ever escape wasmtime, the process it lands in can start no
program, create no process or socket, trace no other process and reach none of the kernel's
rarely needed attack surface (BPF, io_uring, keyrings, modules, mounts, namespaces). Everything
else stays allowed: the Python runtime and wasmtime need a broad set of calls, and an allow-list
that breaks on the next release of either would be worse than this.

Threads stay possible: ``clone`` is allowed only with ``CLONE_THREAD``, and ``clone3`` (whose
flags a filter cannot read) fails with ``ENOSYS`` so that the C library falls back to ``clone``.
System calls of another ABI (32-bit x86, x32) are refused wholesale.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_CLONE_THREAD = 0x00010000

_LD_ABS_W = 0x20
_JEQ = 0x15
_JGE = 0x35
_JSET = 0x45
_RET = 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000

# Offsets in struct seccomp_data: nr, arch, instruction pointer, then the arguments.
_NR, _ARCH, _ARG0 = 0, 4, 16

_ARCHES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (
        0xC000003E,
        {
            "socket": 41, "connect": 42, "accept": 43, "bind": 49, "listen": 50,
            "socketpair": 53, "accept4": 288, "fork": 57, "vfork": 58, "execve": 59,
            "execveat": 322, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
            "pidfd_getfd": 438, "process_madvise": 440, "kexec_load": 246,
            "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
            "delete_module": 176, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
            "unshare": 272, "setns": 308, "bpf": 321, "perf_event_open": 298, "keyctl": 250,
            "add_key": 248, "request_key": 249, "userfaultfd": 323, "io_uring_setup": 425,
            "io_uring_enter": 426, "io_uring_register": 427, "name_to_handle_at": 303,
            "open_by_handle_at": 304,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "socket": 198, "connect": 203, "accept": 202, "bind": 200, "listen": 201,
            "socketpair": 199, "accept4": 242, "execve": 221, "execveat": 281, "ptrace": 117,
            "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_getfd": 438,
            "process_madvise": 440, "kexec_load": 104, "kexec_file_load": 294,
            "init_module": 105, "finit_module": 273, "delete_module": 106, "mount": 40,
            "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268,
            "bpf": 280, "perf_event_open": 241, "keyctl": 219, "add_key": 217,
            "request_key": 218, "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
            "io_uring_register": 427, "name_to_handle_at": 264, "open_by_handle_at": 265,
        },
    ),
}  # fmt: skip
_CLONE = {"x86_64": 56, "aarch64": 220}
_CLONE3 = 435


def supported() -> bool:
    """Whether this machine's architecture has a deny-list here."""
    return platform.machine() in _ARCHES


def program(machine: str) -> list[tuple[int, int, int, int]]:
    """The BPF program for ``machine`` as (code, jump-if-true, jump-if-false, k) tuples."""
    audit_arch, denied = _ARCHES[machine]
    checks: list[tuple[int, int]] = []  # (opcode, k) jumping to DENY when true
    if machine == "x86_64":
        checks.append((_JGE, 0x40000000))  # the x32 ABI sets this bit in the number
    checks += [(_JEQ, number) for number in sorted(denied.values())]
    # Layout: [ld arch, jeq arch, ret deny-all, ld nr, *checks, jeq clone3, jeq clone,
    #          ld arg0, jset CLONE_THREAD, ALLOW, DENY, ENOSYS]
    code: list[tuple[int, int, int, int]] = [
        (_LD_ABS_W, 0, 0, _ARCH),
        (_JEQ, 1, 0, audit_arch),
        (_RET, 0, 0, _ERRNO | errno.EPERM),
        (_LD_ABS_W, 0, 0, _NR),
    ]
    tail = 4  # the instructions between the last check and ALLOW
    for position, (opcode, value) in enumerate(checks):
        to_deny = (len(checks) - position - 1) + tail + 1  # past the later checks, ALLOW
        code.append((opcode, to_deny, 0, value))
    code += [
        (_JEQ, 5, 0, _CLONE3),  # -> ENOSYS
        (_JEQ, 0, 2, _CLONE[machine]),  # not clone -> ALLOW
        (_LD_ABS_W, 0, 0, _ARG0),
        (_JSET, 0, 1, _CLONE_THREAD),  # a thread -> ALLOW, else -> DENY
        (_RET, 0, 0, _ALLOW),
        (_RET, 0, 0, _ERRNO | errno.EPERM),
        (_RET, 0, 0, _ERRNO | errno.ENOSYS),
    ]
    return code


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def install() -> bool:
    """Apply the deny-list to the calling process (all its threads, for good).

    Returns ``False`` where the architecture has no deny-list here. Sets ``no_new_privs``,
    which an unprivileged process needs before it may install a filter.

    Raises:
        OSError: the kernel refused the filter.
    """
    machine = platform.machine()
    if machine not in _ARCHES:
        return False
    raw = b"".join(struct.pack("=HBBI", *instruction) for instruction in program(machine))
    buffer = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SockFprog(len(raw) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    # TSYNC is not needed: the workers install this before starting any thread of their own.
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
    return True
