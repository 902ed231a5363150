"""The seccomp profile of Docker tasks: an allow-list, stricter than Docker's default.

Everything not listed fails with ``EPERM``; system calls of another ABI (32-bit ones on a 64-bit
host) kill the process. The list holds what ordinary programs use: files, memory, threads,
processes, signals, time, local IPC and sockets. It leaves out, each for a reason:

- ``ptrace``, ``process_vm_readv/writev``, ``kcmp``, ``pidfd_getfd``: reading or steering another
  process; Docker's default still lets a task trace process 1 of its container.
- ``io_uring_*``: a large kernel surface with a record of privilege escalations; Docker's default
  profile here allows it.
- ``keyctl``, ``add_key``, ``request_key``: the kernel keyrings are not namespaced.
- ``bpf``, ``perf_event_open``, ``userfaultfd``: kernel attack surface, and ``userfaultfd``
  makes kernel races easy to win.
- ``mount`` and the new mount API, ``umount2``, ``pivot_root``, ``chroot``, ``unshare``,
  ``setns``, and ``clone`` with a namespace flag: no task needs new namespaces or mounts.
- module loading, ``kexec``, ``reboot``, swap, ``acct``, quotas, clock and host name setters,
  ``syslog``, ``iopl``/``ioperm``, ``modify_ldt``, ``open_by_handle_at`` (the classic container
  escape), NUMA memory policy and ``fanotify``: host administration, none of a task's business.
- ``socket`` of any family but Unix, IPv4, IPv6 and netlink: ``AF_VSOCK`` in particular is a
  channel to the hypervisor on a VM, and Docker's default profile allows it.

Signals, and ``pidfd_open``, may not target process 1 (our init): gVisor, unlike Linux, lets a
process kill the init of its namespace, which would end the run without its exit status.

``mknod`` makes FIFOs and regular files only: gVisor, unlike Linux, lets a process without
``CAP_MKNOD`` make device nodes.

``clone3`` fails with ``ENOSYS`` rather than ``EPERM`` so that the C library falls back to
``clone``, whose flags a filter can see.

Under gVisor (``runsc``) a task's system calls go to gVisor's own kernel, which stands in for
this profile; runsc applies an OCI seccomp profile only when it runs with ``--oci-seccomp``, and
then it needs a variant of its own (``profile(runtime="runsc")``), since runsc reads the profile
its own way:

- it ignores a rule's ``errnoRet`` (release 20221219 answers ``EPERM``), so ``clone3`` would fail
  with ``EPERM`` and glibc (>= 2.34), which falls back to ``clone`` only on ``ENOSYS``, could
  start no thread. The variant allows ``clone3``: that gVisor does not implement it (``ENOSYS``,
  then the fallback), and a gVisor that does makes its namespaces inside its own kernel, never
  the host's. runc must never get this variant: there it would let a task make namespaces.
- it looks names up in its own syscall table, which calls ``pselect6`` ``pselect``: without that
  name ``select()`` fails. (``openat2``, ``futex_waitv`` and ``landlock_*`` are unknown to it,
  so they fail with ``EPERM`` there rather than ``ENOSYS``.) Names a runtime does not know are
  skipped, by runc too.
"""

from __future__ import annotations

import functools
import json
import platform
from typing import Any

_ALLOWED = """
accept accept4 access alarm bind brk capget capset chdir chmod chown clock_getres
clock_gettime clock_nanosleep close close_range connect copy_file_range creat dup dup2 dup3
epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd eventfd2 execve
execveat exit exit_group faccessat faccessat2 fadvise64 fallocate fchdir fchmod fchmodat fchown
fchownat fcntl fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstatfs
fsync ftruncate futex futex_waitv futimesat getcpu getcwd getdents getdents64 getegid geteuid
getgid getgroups getitimer getpeername getpgid getpgrp getpid getppid getpriority getrandom
getresgid getresuid getrlimit get_robust_list getrusage getsid getsockname getsockopt gettid
gettimeofday getuid getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch
io_cancel ioctl io_destroy io_getevents io_pgetevents ioprio_get ioprio_set io_setup io_submit
landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lgetxattr link
linkat listen listxattr llistxattr lremovexattr lseek lsetxattr lstat madvise membarrier
memfd_create mincore mkdir mkdirat mlock mlock2 mlockall mmap mprotect
mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend mq_unlink mremap msgctl msgget
msgrcv msgsnd msync munlock munlockall munmap nanosleep newfstatat open openat openat2 pause
pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll prctl
pread64 preadv preadv2 prlimit64 pselect6 pwrite64 pwritev pwritev2 read readahead readlink
readlinkat readv recvfrom recvmmsg recvmsg remap_file_pages removexattr rename renameat
renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask
rt_sigreturn rt_sigsuspend rt_sigtimedwait sched_getaffinity sched_getattr
sched_getparam sched_get_priority_max sched_get_priority_min sched_getscheduler
sched_rr_get_interval sched_setaffinity sched_setattr sched_setparam sched_setscheduler
sched_yield seccomp select semctl semget semop semtimedop sendfile sendmmsg sendmsg sendto
setfsgid setfsuid setgid setgroups setitimer setpgid setpriority setregid setresgid setresuid
setreuid setrlimit set_robust_list setsid setsockopt set_tid_address setuid setxattr shmat
shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 socketpair splice stat statfs statx
symlink symlinkat sync sync_file_range syncfs sysinfo tee time timer_create timer_delete
timer_getoverrun timer_gettime timer_settime timerfd_create timerfd_gettime timerfd_settime
times truncate umask uname unlink unlinkat utime utimensat utimes vfork wait4 waitid
write writev
""".split()  # noqa: SIM905 - a word list reads better than 300 quoted strings

_X86_64_ONLY = ["arch_prctl", "epoll_ctl_old", "epoll_wait_old", "_newselect"]

#: Calls whose first argument is the target process (or thread group): allowed unless it is 1.
_SIGNALLING = ["kill", "pidfd_open", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "tgkill", "tkill"]
#: The file types mknod may make: regular files (also spelled 0) and FIFOs.
_NODE_TYPES = (0o000000, 0o100000, 0o010000)
_S_IFMT = 0o170000
_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_SOCKET_FAMILIES = (1, 2, 10, 16)  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
# personality(2) values that change nothing dangerous: the default, UNAME26, ADDR_NO_RANDOMIZE
# (used by some debuggers and test runners), their combination, and the query 0xffffffff.
_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
_EPERM = 1
_ENOSYS = 38

_ARCHES = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}


def _equal(index: int, value: int) -> dict[str, Any]:
    return {"index": index, "value": value, "op": "SCMP_CMP_EQ"}


#: What the runsc variant adds: see the module docstring.
_RUNSC_ONLY = ["clone3", "pselect"]


@functools.cache
def profile(machine: str | None = None, runtime: str = "runc") -> dict[str, Any]:
    """The profile as Docker's JSON format has it, for ``machine`` (default: this host's) and
    the OCI ``runtime`` (``runsc`` gets its variant; any other, the profile for Linux)."""
    machine = machine or platform.machine()
    gvisor = runtime == "runsc"
    names = sorted(
        _ALLOWED + (_X86_64_ONLY if machine == "x86_64" else []) + (_RUNSC_ONLY if gvisor else [])
    )
    rules: list[dict[str, Any]] = [{"names": names, "action": "SCMP_ACT_ALLOW"}]
    rules.append(
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                {"index": 0, "value": _NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
            ],
        }
    )
    if not gvisor:
        rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS})
    rules.append(
        {
            "names": _SIGNALLING,
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_NE"}],
        }
    )
    rules.extend(
        {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [_equal(0, family)]}
        for family in _SOCKET_FAMILIES
    )
    rules.extend(
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [_equal(0, value)]}
        for value in _PERSONALITIES
    )
    for name, mode_arg in (("mknod", 1), ("mknodat", 2)):
        rules.extend(
            {
                "names": [name],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {
                        "index": mode_arg,
                        "value": _S_IFMT,
                        "valueTwo": kind,
                        "op": "SCMP_CMP_MASKED_EQ",
                    }
                ],
            }
            for kind in _NODE_TYPES
        )
    document: dict[str, Any] = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": _EPERM,
        "syscalls": rules,
    }
    if machine in _ARCHES:
        document["architectures"] = [_ARCHES[machine]]
    return document


@functools.cache
def security_opt(machine: str | None = None, runtime: str = "runc") -> str:
    """The ``--security-opt`` value that installs the profile for ``runtime``."""
    return "seccomp=" + json.dumps(profile(machine, runtime), separators=(",", ":"))
