"""The data model: ``Limits``, ``Task`` and ``Result``.

Models are immutable pydantic models validated once, when they are made. Every field of a task is
treated as hostile: names, paths, sizes and counts are checked here, and a bad value raises
:class:`~parity_sandbox.InvalidInput` naming the field before anything runs.
"""

from __future__ import annotations

import itertools
import re
import threading
import warnings
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from parity_sandbox import runtimes
from parity_sandbox._egress import parse_grants
from parity_sandbox._exceptions import (
    ExecutionError,
    ExecutionTimeout,
    InvalidInput,
    LaunchFailed,
    ResourceLimitExceeded,
    SandboxError,
    TaskFailed,
)
from parity_sandbox._hashing import VERSION as HASH_VERSION
from parity_sandbox._hashing import digest, sha256_hex
from parity_sandbox._units import (
    COUNT_FORM,
    CPU_FORM,
    DURATION_FORM,
    SIZE_FORM,
    parse_count,
    parse_cpu,
    parse_duration,
    parse_size,
    split_mount,
)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# Caps on what a task may carry; far above honest use, low enough that a hostile task cannot make
# the host allocate or copy without bound.
MAX_MODULE_BYTES = 256 * MiB
MAX_ARGV_ENV_BYTES = 1 * MiB
MAX_ARGS = 4096
MAX_ENV_VARS = 4096
MAX_STDIN_BYTES = 256 * MiB
MAX_INPUT_FILES = 1000
MAX_INPUT_BYTES = 1 * GiB
MAX_OUTPUT_PATHS = 64
MAX_LABELS = 64
MAX_PATH_DEPTH = 32
MAX_PATH_CHARS = 1024
MAX_NAME_CHARS = 255

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
# A Docker image reference (``[registry[:port]/]name[:tag][@sha256:...]``) or an image id. The
# grammar alone keeps out flags ("-v..."), whitespace, NUL and anything else a shell or an API
# could read as more than a name.
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*(?::[0-9]{1,5})?/)?"
_IMAGE_RE = re.compile(
    rf"{_IMAGE_HOST}{_IMAGE_COMPONENT}(?:/{_IMAGE_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
    r"|sha256:[0-9a-f]{64}"
)
MAX_IMAGE_CHARS = 512
_USER_RE = re.compile(r"([0-9]{1,10})(?::([0-9]{1,10}))?")
MAX_ID = 2**31 - 2
#: The fuel of a deterministic task that sets none: fuel is its only CPU limit (about 10^10
#: WebAssembly instructions, seconds of work on current CPUs).
DETERMINISTIC_FUEL = 10_000_000_000
#: Fields that only Docker tasks have.
DOCKER_FIELDS = ("command", "user", "oci_runtime", "gpus")
#: Trees a task may mount (``Task.mounts``).
MAX_MOUNTS = 16
#: Where a mount may not go: the sandbox's own places and the system's (a task would shadow
#: what runs it, or what it runs on).
_RESERVED_MOUNTS = (
    "/work",
    "/input",
    "/tmp",
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/usr",
    "/.parity",
)


def check_mount_path(path: str) -> str:
    """Validate a guest path a tree is mounted at (under ``/work``: a writable copy in the
    workspace; ``/``: the guest's root, WebAssembly only); ``ValueError`` saying why not."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"{str(path)[:80]!r} must be an absolute path such as /data")
    if path == "/":
        return path
    _check_relative_path(path[1:], "mount path")
    if path.startswith("/work/"):
        return path
    for reserved in _RESERVED_MOUNTS:
        if path == reserved or path.startswith(reserved + "/"):
            raise ValueError(f"{path[:80]!r} lies in {reserved}, which is reserved")
    return path


#: Fields that only WebAssembly tasks have.
WASM_FIELDS = ("entry", "entry_exit")
#: A WebAssembly export a task may name as its entry point.
_EXPORT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.$-]{0,255}")


def _ranged(parse: Any, low: float, high: float, form: str, unit: str = "") -> Any:
    """A before-validator that parses with ``parse`` and checks ``low <= value <= high``."""

    def check(value: object) -> object:
        if value is None:
            return None
        number = parse(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low:g}{unit} and {high:g}{unit}; expected {form}")
        return number

    return BeforeValidator(check)


Size = Annotated[int, _ranged(parse_size, 1 * MiB, 1 << 40, SIZE_FORM, " bytes")]
OutputSize = Annotated[int, _ranged(parse_size, 0, 1 * GiB, SIZE_FORM, " bytes")]
StackSize = Annotated[int, _ranged(parse_size, 64 * KiB, 4 * MiB, SIZE_FORM, " bytes")]
Seconds = Annotated[float, _ranged(parse_duration, 0.001, 7 * 24 * 3600, DURATION_FORM, " s")]
Cores = Annotated[float, _ranged(parse_cpu, 0.01, 1024, CPU_FORM)]
Pids = Annotated[int, _ranged(parse_count, 1, 32768, COUNT_FORM)]
Fuel = Annotated[int, _ranged(parse_count, 1, 2**63 - 1, COUNT_FORM)]
FileSize = Annotated[int, _ranged(parse_size, 0, 1 << 40, SIZE_FORM, " bytes")]
InputSize = Annotated[int, _ranged(parse_size, 0, MAX_INPUT_BYTES, SIZE_FORM, " bytes")]
OpenFiles = Annotated[int, _ranged(parse_count, 16, 1 << 20, COUNT_FORM)]
OutputFiles = Annotated[int, _ranged(parse_count, 0, 100_000, COUNT_FORM)]

#: What a limit left unset everywhere (task, configuration) means, for the limits whose
#: default is not a number in the configuration's defaults.
DEFAULT_OPEN_FILES = 4096
DEFAULT_OUTPUT_FILES = 1000
#: Unset ``input``: a task may bring input bytes up to this share of its memory limit.
DEFAULT_INPUT_SHARE = 0.5


_validating = threading.local()


class _Model(BaseModel):
    """Base of the public models: frozen, strict about keys, and raising ``InvalidInput``."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    def __init__(self, **data: Any) -> None:
        # Only the outermost model turns pydantic's report into InvalidInput, so that a nested
        # model's errors keep their full location ("limits.memory").
        outermost = not getattr(_validating, "depth", 0)
        _validating.depth = getattr(_validating, "depth", 0) + 1
        try:
            super().__init__(**data)
        except ValidationError as exc:
            if not outermost:
                raise
            raise InvalidInput.from_validation(exc, model=type(self)) from None
        finally:
            _validating.depth -= 1

    @classmethod
    def from_document(cls, document: Any, prefix: str = "") -> Self:
        """Validate a parsed document (a file's mapping); errors name ``prefix.key``."""
        _validating.depth = getattr(_validating, "depth", 0) + 1
        try:
            return cls.model_validate(document)
        except ValidationError as exc:
            raise InvalidInput.from_validation(exc, prefix, model=cls) from None
        finally:
            _validating.depth -= 1


class Limits(_Model):
    """Resource limits of a task. ``None`` means "inherit from the configuration".

    Sizes accept bytes or strings such as ``"512m"``; durations accept seconds, strings such as
    ``"5m"`` or a ``timedelta``. Zero never means "unlimited": out-of-range values are rejected.
    """

    memory: Size | None = None
    cpu: Cores | None = None
    pids: Pids | None = None
    disk: Size | None = None
    output: OutputSize | None = None
    timeout: Seconds | None = None
    fuel: Fuel | None = None
    stack_size: StackSize | None = None
    #: Open file descriptors of each process (default 4096; Docker only).
    open_files: OpenFiles | None = None
    #: The largest file the task may write (default: the disk cap).
    file_size: FileSize | None = None
    #: Output files collected at most (default 1000); past it, ``files_truncated``.
    output_files: OutputFiles | None = None
    #: Bytes the task brings (stdin and input files), which the host holds for it outside
    #: its memory limit; default: half the memory limit.
    input: InputSize | None = None

    def merged(self, override: Limits) -> Limits:
        """Return these limits with every field that ``override`` sets replaced."""
        return self.model_copy(update=override.model_dump(exclude_none=True))

    @property
    def open_files_or_default(self) -> int:
        return self.open_files if self.open_files is not None else DEFAULT_OPEN_FILES

    @property
    def output_files_or_default(self) -> int:
        return self.output_files if self.output_files is not None else DEFAULT_OUTPUT_FILES

    @property
    def input_or_default(self) -> int:
        """The input bytes allowed: ``input``, else a share of the memory limit."""
        if self.input is not None:
            return self.input
        return int((self.memory or 0) * DEFAULT_INPUT_SHARE)


def renamed(data: Any, names: dict[str, str], where: str) -> Any:
    """``data`` (a mapping about to be validated) with old key names replaced by ``names``'
    new ones, each with a DeprecationWarning; both spellings at once is an error."""
    if not isinstance(data, dict) or not any(old in data for old in names):
        return data
    data = dict(data)
    for old, new in names.items():
        if old not in data:
            continue
        if new in data:
            raise ValueError(f"give {new} only ({old} is its old name)")
        warnings.warn(
            f"{where}: {old} is now called {new}; the old name will go",
            DeprecationWarning,
            stacklevel=6,
        )
        data[new] = data.pop(old)
    return data


def check_input_bytes(size: int, limits: Limits) -> None:
    """Refuse a task that brings more bytes (stdin and input files) than ``limits.input``.

    The host holds those bytes for the task, outside its memory limit (Docker's ``/input``
    is filled by the daemon, not by the task's cgroup; a WASM worker keeps them in its own
    memory and directory), so they are bounded, and counted by batch admission, separately.

    Raises:
        InvalidInput: ``size`` is over the limit.
    """
    allowed = limits.input_or_default
    if size > allowed:
        source = "limits.input" if limits.input is not None else "half the memory limit"
        raise InvalidInput(
            f"input_files: the task brings {size} bytes of input (stdin and files), more than "
            f"the {allowed} bytes allowed ({source}); raise limits.input or limits.memory",
            field="input_files",
        )


def check_image_reference(value: str) -> str:
    """``value`` if it is a Docker image reference or id; raises ``ValueError`` otherwise."""
    if len(value) > MAX_IMAGE_CHARS or not _IMAGE_RE.fullmatch(value):
        raise ValueError(
            f"{value[:80]!r} is not an image reference; expected NAME[:TAG][@sha256:DIGEST] "
            "(lowercase name) or sha256:ID"
        )
    return value


def _check_relative_path(value: str, what: str) -> str:
    """Validate a sandbox-relative path: no absolute paths, ``..``, NUL or oversize parts."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty relative path")
    if "\x00" in value or "\\" in value:
        raise ValueError(f"{what} {value!r} contains a NUL byte or a backslash")
    if len(value) > MAX_PATH_CHARS:
        raise ValueError(f"{what} is longer than {MAX_PATH_CHARS} characters")
    if value.startswith("/"):
        raise ValueError(f"{what} {value!r} is absolute; give a path relative to the sandbox dir")
    parts = value.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{what} {value!r} must not contain empty, '.' or '..' components")
    if len(parts) > MAX_PATH_DEPTH or any(len(part) > MAX_NAME_CHARS for part in parts):
        raise ValueError(f"{what} {value!r} is too deep or has a component over 255 characters")
    return value


class Network(_Model):
    """The network egress a task is granted (Docker): ``allow`` lists what it may reach, as
    ``HOST:PORT``, ``*.DOMAIN:PORT``, ``ADDRESS:PORT`` or ``CIDR:PORT`` (IPv6 in brackets).
    A name must resolve to public addresses unless an address grant names its range; DNS is
    the proxy's, never the task's. See ``parity_sandbox._egress``."""

    allow: tuple[str, ...]

    @field_validator("allow")
    @classmethod
    def _grants(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(grant) for grant in parse_grants(value))  # in their canonical form


class Task(_Model):
    """One unit of untrusted work.

    Args:
        wasm_file: path of a WASI (preview 1) command module on the host.
        wasm_module: the module's bytes, instead of ``wasm_file``.
        image: a Docker image (name, ``name@sha256:...`` or image id), instead of a module.
        args: arguments after the program name (WebAssembly).
        command: the container's argv (Docker); default: the image's entrypoint and command.
        workdir: the task's working directory, where relative paths resolve (default
            ``/work``, the workspace; a WebAssembly task's must lie under ``/work``).
        user: ``"uid"`` or ``"uid:gid"`` the container runs as (Docker; default 65534:65534).
        oci_runtime: ``"runc"`` or ``"runsc"`` (gVisor); default: the configured one
            (``docker_runtime``, its old name, is accepted with a DeprecationWarning).
        gpus: GPUs to give the container: a count or ``"all"`` (Docker).
        privileged: ask for a privileged container; refused unless the operator allows it.
        env: the environment of the task; nothing of the host's reaches it (a Docker image's
            own ``ENV`` still applies).
        deterministic: WebAssembly only: run so that the same task gives the same result on
            any machine (fuel is the CPU limit, NaNs are canonical, clocks and randomness come
            from the task); such results may be cached.
        cacheable: the caller vouches that the output depends only on the task, so its result
            may be cached even without ``deterministic``.
        input: bytes fed to the task's standard input (also accepted as ``stdin`` or ``Input``).
        input_files: files made read-only under ``/input``: name -> bytes, or name -> host
            ``pathlib.Path`` whose content is copied in when the task runs.
        outputs: paths under ``/work`` collected after the run (default ``out``).
        mounts: guest path -> a folder of ``input_files``: that tree, read-only, at that path
            instead of under ``/input`` (``{"/data": "fixture"}`` shows ``input_files``'
            ``fixture/a.txt`` as ``/data/a.txt``), in both runtimes alike; under ``/work``,
            a writable copy in the workspace (counted in ``disk``). At ``/`` (WebAssembly
            only; Docker refuses it): the guest's root and working directory, fd 3, so that
            ``/a.txt`` and ``a.txt`` are both its ``a.txt``; the workspace is then reached as
            ``/work`` only, and ``workdir`` may not be set. A folder ending in ``:rw``
            (``{"/": "fixture:rw"}``) is a writable copy of the tree, the task's own for its
            run and counted in ``disk``; ``:ro`` (the default) read-only.
        required_outputs: outputs (or paths under them) the task must leave: one missing
            ends it ``failed`` with a ``MissingOutput`` error, whatever its exit code.
        limits: overrides of the configured limits.
        id: an optional caller-chosen identifier, echoed in the result.
        labels: free-form key/value labels, echoed in the result.
        runtime: ``"wasm"`` or ``"docker"``; ``None`` picks the configured default.
        entry: a WebAssembly reactor's entry point (a module without ``_start``):
            ``_initialize`` runs first if exported, then this export; its integer result is
            the exit code (CLI ``--invoke``).
        entry_exit: an export called with that exit code after ``entry`` (a finaliser, such
            as ``itk_wasm_delayed_exit``).
        network: ``None`` or ``"none"`` (no network: the default), or the egress it is
            granted, ``{"allow": ["data.example.org:443", ...]}`` (Docker; see ``Network``).
    """

    wasm_file: Path | None = None
    wasm_module: bytes | None = Field(default=None, repr=False)
    image: str | None = None
    args: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    workdir: str | None = None
    user: str | None = None
    oci_runtime: Literal["runc", "runsc"] | None = None
    gpus: Annotated[int, Field(ge=1, le=64)] | Literal["all"] | None = None
    privileged: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    # The seed calls stdin ``Input``; ``stdin`` is the plainer spelling.
    input: bytes = Field(
        default=b"", repr=False, validation_alias=AliasChoices("input", "stdin", "Input")
    )
    input_files: dict[str, bytes | Path] = Field(default_factory=dict, repr=False)
    outputs: tuple[str, ...] = ("out",)
    required_outputs: tuple[str, ...] = ()
    mounts: dict[str, str] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    id: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    runtime: str | None = None
    deterministic: bool = False
    cacheable: bool = False
    network: Network | None = None
    entry: str | None = None
    entry_exit: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _old_spellings(cls, data: Any) -> Any:
        return renamed(data, {"docker_runtime": "oci_runtime"}, "Task")

    @field_validator("network", mode="before")
    @classmethod
    def _no_network(cls, value: Any) -> Any:
        # "none" and an empty list grant nothing: the same task as one without the field.
        if value == "none" or (isinstance(value, dict) and value.get("allow") in ([], ())):
            return None
        return value

    @field_validator("runtime")
    @classmethod
    def _registered(cls, value: str | None) -> str | None:
        if value is not None and value not in runtimes.names():
            raise ValueError(
                f"{value[:40]!r} is not a runtime; choose one of {', '.join(runtimes.names())}"
            )
        return value

    @field_validator("wasm_module")
    @classmethod
    def _module_size(cls, value: bytes | None) -> bytes | None:
        if value is not None and len(value) > MAX_MODULE_BYTES:
            raise ValueError(f"module is larger than {MAX_MODULE_BYTES // MiB} MiB")
        return value

    @field_validator("wasm_file")
    @classmethod
    def _wasm_path(cls, value: Path | None) -> Path | None:
        if value is not None and "\x00" in str(value):
            raise ValueError("path contains a NUL byte")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        return None if value is None else check_image_reference(value)

    @field_validator("entry", "entry_exit")
    @classmethod
    def _export_name(cls, value: str | None) -> str | None:
        if value is not None and not _EXPORT_RE.fullmatch(value):
            raise ValueError(
                f"{value[:80]!r} is not an export name this accepts (a letter or _, then "
                "letters, digits, _ . $ -; at most 256)"
            )
        return value

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str | None) -> str | None:
        if value is None or value == "/":
            return value
        if not value.startswith("/"):
            raise ValueError(f"{value[:80]!r} must be an absolute path such as /work")
        _check_relative_path(value[1:], "workdir")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _USER_RE.fullmatch(value)
        if not match or any(int(part) > MAX_ID for part in match.groups() if part):
            raise ValueError(
                f"{value[:80]!r} must be a numeric UID or UID:GID (names are not looked up)"
            )
        return value

    @field_validator("args", "command")
    @classmethod
    def _args(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if len(value) > MAX_ARGS:
            raise ValueError(f"more than {MAX_ARGS} arguments")
        for arg in value:
            if "\x00" in arg:
                raise ValueError("an argument contains a NUL byte")
        if sum(len(arg.encode()) + 1 for arg in value) > MAX_ARGV_ENV_BYTES:
            raise ValueError(f"arguments total more than {MAX_ARGV_ENV_BYTES // MiB} MiB")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_ENV_VARS:
            raise ValueError(f"more than {MAX_ENV_VARS} variables")
        for name, val in value.items():
            if not _ENV_NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a variable name (letters, digits, '_')")
            if "\x00" in val:
                raise ValueError(f"the value of {name} contains a NUL byte")
        if (
            sum(len(k.encode()) + len(v.encode()) + 2 for k, v in value.items())
            > MAX_ARGV_ENV_BYTES
        ):
            raise ValueError(f"environment totals more than {MAX_ARGV_ENV_BYTES // MiB} MiB")
        return value

    @field_validator("input")
    @classmethod
    def _stdin(cls, value: bytes) -> bytes:
        if len(value) > MAX_STDIN_BYTES:
            raise ValueError(f"stdin is larger than {MAX_STDIN_BYTES // MiB} MiB")
        return value

    @field_validator("input_files", mode="before")
    @classmethod
    def _input_files(cls, value: object) -> object:
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of name -> bytes or pathlib.Path")
        if len(value) > MAX_INPUT_FILES:
            raise ValueError(f"more than {MAX_INPUT_FILES} input files")
        total = 0
        for name, content in value.items():
            _check_relative_path(name, "input file name")
            if isinstance(content, bytes | bytearray | memoryview):
                total += len(content)
            elif not isinstance(content, Path):
                raise ValueError(
                    f"input file {name!r}: give bytes (the content) or a pathlib.Path "
                    f"(a host file), not {type(content).__name__}"
                )
        if total > MAX_INPUT_BYTES:
            raise ValueError(f"input files total more than {MAX_INPUT_BYTES // MiB} MiB")
        names = sorted(value)
        for first, second in itertools.pairwise(names):
            if second.startswith(first + "/"):
                raise ValueError(f"input file {first!r} is also used as a directory")
        return value

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > MAX_OUTPUT_PATHS:
            raise ValueError(f"more than {MAX_OUTPUT_PATHS} output paths")
        return tuple(
            _check_relative_path(path.removeprefix("/work/"), "output path") for path in value
        )

    @field_validator("mounts")
    @classmethod
    def _mounted_trees(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        if len(value) > MAX_MOUNTS:
            raise ValueError(f"at most {MAX_MOUNTS}")
        names = list(info.data.get("input_files") or {})
        folders: dict[str, str] = {}
        canonical: dict[str, str] = {}
        for guest, given in value.items():
            check_mount_path(guest)
            folder, writable = split_mount(given)
            _check_relative_path(folder, "mounts folder")
            if not any(name.startswith(folder + "/") for name in names):
                raise ValueError(
                    f"{guest}: no input file lies under {folder!r}: give its files as "
                    f"input_files {folder}/NAME"
                )
            if guest.startswith("/work/") and given.endswith(":ro"):
                raise ValueError(
                    f"{guest}: a tree under /work is a writable copy in the workspace; mount "
                    "it elsewhere to have it read-only"
                )
            folders[guest] = folder
            # One spelling per meaning, so that equal tasks hash alike: read-only is the
            # default, and a tree under /work is always a writable copy.
            canonical[guest] = (
                f"{folder}:rw" if writable and not guest.startswith("/work/") else folder
            )
        # A tree at / may hold other mounts (they hide its folders of that name, as /work and
        # /input do): "//" begins no other mount path.
        for one, other in itertools.pairwise(sorted(value)):
            if other.startswith(one + "/"):
                raise ValueError(f"{other} lies inside {one}")
        if "/" in value and info.data.get("workdir") not in (None, "/work"):
            raise ValueError(
                "a tree mounted at / is the working directory (relative paths resolve in it): "
                "leave workdir unset"
            )
        for one, other in itertools.pairwise(sorted(folders.values())):
            if other == one or other.startswith(one + "/"):
                raise ValueError(f"the folder {other!r} is mounted twice (in {one!r})")
        return canonical

    @field_validator("required_outputs")
    @classmethod
    def _required(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if len(value) > MAX_OUTPUT_PATHS:
            raise ValueError(f"more than {MAX_OUTPUT_PATHS} required outputs")
        outputs = info.data.get("outputs", ())
        paths = []
        for path in value:
            path = _check_relative_path(path.removeprefix("/work/"), "required output")
            if not any(path == out or path.startswith(out + "/") for out in outputs):
                raise ValueError(f"{path!r} lies under none of outputs ({', '.join(outputs)})")
            paths.append(path)
        return tuple(paths)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        if value is not None and not _ID_RE.fullmatch(value):
            raise ValueError("must be 1-128 characters of letters, digits and . _ : -")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_LABELS:
            raise ValueError(f"more than {MAX_LABELS} labels")
        for key, val in value.items():
            if not _LABEL_KEY_RE.fullmatch(key):
                raise ValueError(f"label key {key!r} must be letters, digits and . _ / -")
            if len(val) > 1024 or "\x00" in val:
                raise ValueError(f"label {key!r} is longer than 1024 characters or has NUL")
        return value

    @model_validator(mode="after")
    def _one_program(self) -> Task:
        given = [f for f in ("wasm_file", "wasm_module", "image") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of wasm_file, wasm_module or image")
        if self.image is not None and self.deterministic:
            raise ValueError(
                "deterministic mode is for WebAssembly tasks; mark a Docker task cacheable"
            )
        if self.image is None:
            docker_only = [f for f in DOCKER_FIELDS if getattr(self, f) is not None]
            if self.runtime == "docker" or docker_only or self.privileged:
                raise ValueError(
                    f"{', '.join(docker_only) or 'runtime docker'} needs a Docker task: give image"
                )
            if self.workdir is not None and not (
                self.workdir == "/work" or self.workdir.startswith("/work/")
            ):
                raise ValueError(
                    f"workdir: a WebAssembly task's working directory lies under /work, not "
                    f"{self.workdir[:80]!r}"
                )
            if self.entry_exit is not None and self.entry is None:
                raise ValueError("entry_exit needs entry: the export whose result it takes")
        else:
            wasm_only = [f for f in WASM_FIELDS if getattr(self, f) is not None]
            if wasm_only:
                raise ValueError(f"{', '.join(wasm_only)}: for WebAssembly tasks (a reactor)")
            if self.runtime == "wasm":
                raise ValueError("image is a Docker task; a wasm task gives wasm_file")
            if self.args:
                raise ValueError("args are for WebAssembly tasks; a Docker task gives command")
        return self

    def effective_limits(self, limits: Limits) -> Limits:
        """``limits`` as this task runs under them: a deterministic task always has fuel."""
        if self.deterministic and limits.fuel is None:
            return limits.model_copy(update={"fuel": DETERMINISTIC_FUEL})
        return limits

    def embedded_inputs(self) -> dict[str, bytes]:
        """The input files' contents when all of them are given as bytes (a record's task, a
        batch line's); reads nothing.

        Raises:
            InvalidInput: an input file is a host path: reading it is the caller's.
        """
        contents: dict[str, bytes] = {}
        for name, content in self.input_files.items():
            if isinstance(content, Path):
                raise InvalidInput(
                    f"input_files[{name}]: a host file; read it first (parity_sandbox.portable, "
                    "Executor.prepare)",
                    field=f"input_files[{name}]",
                )
            contents[name] = bytes(content)
        return contents

    @property
    def runtime_name(self) -> str | None:
        """The runtime this task names, or implies (``image`` means Docker), else ``None``."""
        return self.runtime or ("docker" if self.image is not None else None)


#: The limits a task can hit (``Result.limit``, ``ResourceLimitExceeded.limit``).
LimitName = Literal["memory", "fuel", "stack", "disk", "file_size", "pids"]


class Status(StrEnum):
    """How a task ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    RESOURCE_LIMIT = "resource_limit"
    ERROR = "error"
    #: The task's program never started (command not found or not executable, no workdir).
    LAUNCH_FAILED = "launch_failed"


class ResourceUsage(BaseModel):
    """What a run consumed, for billing, where the runtime can tell (``None`` when it cannot).

    - ``wall_time``: seconds from the task's start to its end (or its deadline).
    - ``cpu_time``: CPU seconds. WebAssembly: of the thread that ran the guest (exact, ns
      clock). Docker: of the container's cgroup (under runsc, gVisor's own work included).
    - ``peak_memory``: bytes. WebAssembly: the guest's linear memory at its largest (exact).
      Docker: the cgroup's high-water mark, page cache and the tmpfs workspace included.
    - ``input_bytes``: bytes the task brought (stdin and input files), which the host holds
      for it outside its memory limit (Docker's ``/input``, a WASM worker's copy).
    - ``memory_byte_seconds``: ``(peak_memory + input_bytes) * wall_time``, an upper bound of
      the integral of the memory held for the task (memory is not sampled during the run).
    - ``output_bytes``: bytes delivered in the result: stdout, stderr and files as kept.
    - ``fuel_used``: WebAssembly instructions (fuel units) consumed, when fuel is metered.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu_time: float | None = None
    peak_memory: int | None = None
    fuel_used: int | None = None
    wall_time: float | None = None
    memory_byte_seconds: float | None = None
    output_bytes: int | None = None
    input_bytes: int | None = None

    @classmethod
    def measured(
        cls,
        *,
        wall_time: float,
        cpu_time: float | None,
        peak_memory: int | None,
        output_bytes: int,
        input_bytes: int = 0,
        fuel_used: int | None = None,
    ) -> ResourceUsage:
        """Usage from what a runtime measured; the derived figures are computed here."""
        held = None if peak_memory is None else (peak_memory + input_bytes) * wall_time
        return cls(
            cpu_time=cpu_time,
            peak_memory=peak_memory,
            fuel_used=fuel_used,
            wall_time=wall_time,
            memory_byte_seconds=held,
            output_bytes=output_bytes,
            input_bytes=input_bytes,
        )


class RuntimeInfo(BaseModel):
    """Which runtime ran the task."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    module_sha256: str | None = None
    #: Docker: the image as the task named it, its id (``sha256:...``), and runc or runsc.
    image: str | None = None
    image_id: str | None = None
    oci_runtime: str | None = None
    #: Docker: whether the container was started ahead of the task by a warm pool.
    warm: bool | None = None
    #: The Ray node that ran the task (``RayExecutor``): its node id.
    node: str | None = None


class EventKind(StrEnum):
    """What a :class:`SecurityEvent` reports (see docs/ARCHITECTURE.md for which runtime sees
    which)."""

    #: The task hit a limit and was stopped; ``details["limit"]`` names it.
    LIMIT_HIT = "limit_hit"
    #: The task ran past its timeout and was killed; ``details["timeout"]`` in seconds.
    TIMEOUT = "timeout"
    #: Output was cut at a cap; ``details["what"]``: ``stdout``, ``stderr``, ``files``.
    OUTPUT_TRUNCATED = "output_truncated"
    #: The task (a fork bomb, say) reached its process limit (Docker).
    PIDS_EXHAUSTED = "pids_exhausted"
    #: The kernel killed the task for memory (Docker; WebAssembly memory cannot grow past
    #: its limit, which is a ``limit_hit``).
    OOM_KILL = "oom_kill"
    #: The workspace, or a file, reached the disk (or file size) cap.
    DISK_CAP = "disk_cap"
    #: The WebAssembly guest trapped (crashed); ``details["message"]``.
    GUEST_TRAP = "guest_trap"
    #: Output paths that were symlinks, FIFOs, devices or sockets, left out and never
    #: followed; ``details["count"]`` and the first few ``details["paths"]``.
    OUTPUT_NOT_FOLLOWED = "output_not_followed"
    #: The task was rejected as invalid or hostile; ``details["field"]`` names the field.
    INPUT_REJECTED = "input_rejected"
    #: Leftovers of crashed runs were removed (audit log only: no task's result).
    LEFTOVER_REAPED = "leftover_reaped"
    #: The process or container running the task died under it.
    WORKER_LOST = "worker_lost"


#: An event's details: a few plain values (a name, a count, a short list of paths).
EventValue = str | int | float | bool | None | tuple[str, ...]
MAX_EVENT_DETAILS = 16


class NetworkConnection(BaseModel):
    """One connection a task granted a network asked its egress proxy for (``Task.network``):
    where to, whether it was let through (and why not, or why it was cut), the address the
    proxy connected to, and the bytes it carried each way. ``started``/``ended``: Unix time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    port: int
    allowed: bool
    reason: str | None = None
    address: str | None = None
    sent: int = 0
    received: int = 0
    started: float = 0.0
    ended: float | None = None


class SecurityEvent(BaseModel):
    """Something security-relevant the runtime saw during a task, at ``time`` (UTC).

    Events are reported, not judged: a timeout is an event whether the task was hostile or
    just slow. ``Result.result_hash`` leaves them out (they carry times).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: EventKind
    time: datetime
    details: dict[str, EventValue] = Field(default_factory=dict)

    @field_validator("time")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("must carry a time zone (UTC)")
        return value.astimezone(UTC)

    @field_validator("details")
    @classmethod
    def _small(cls, value: dict[str, EventValue]) -> dict[str, EventValue]:
        if len(value) > MAX_EVENT_DETAILS:
            raise ValueError(f"more than {MAX_EVENT_DETAILS} details")
        return value


class ErrorInfo(BaseModel):
    """Why a task did not end normally."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    message: str


class Result(BaseModel):
    """The outcome of one task. ``to_json()`` and ``from_json()`` round-trip it exactly."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )

    status: Status
    exit_code: int | None = None
    stdout: bytes = Field(default=b"", repr=False)
    stderr: bytes = Field(default=b"", repr=False)
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    files: dict[str, bytes] = Field(default_factory=dict, repr=False)
    files_truncated: bool = False
    duration: float = 0.0
    usage: ResourceUsage = Field(default_factory=ResourceUsage)
    runtime: RuntimeInfo | None = None
    #: Which limit a ``resource_limit`` result hit.
    limit: LimitName | None = None
    error: ErrorInfo | None = None
    task_id: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    #: The task's spec hash, where the executor computed it (deterministic or cacheable tasks).
    spec_hash: str | None = None
    #: True when this result came from the result cache instead of a run.
    cached: bool = False
    #: What the runtime saw that matters to security (limits hit, truncation, traps, ...);
    #: not covered by ``result_hash``.
    events: tuple[SecurityEvent, ...] = ()
    #: The connections a task granted a network asked for, allowed or refused (Docker).
    connections: tuple[NetworkConnection, ...] = ()
    #: Runs it took, where an executor retries a task whose node was lost (``RayExecutor``);
    #: not covered by ``result_hash``.
    attempts: int | None = None

    def to_json(self) -> str:
        """This result as JSON, bytes in base64: ``Result.from_json`` gives it back exactly."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> Result:
        """The result ``to_json`` wrote; raises ``InvalidInput`` for anything else."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise InvalidInput.from_validation(exc, "result", model=cls) from None

    @property
    def result_hash(self) -> str:
        """SHA-256 over a canonical encoding of status, exit code, stdout, stderr, output files
        and truncation flags (see ``parity_sandbox._hashing``); equal for equal outcomes.
        ``events`` are left out: they carry times, and the facts of theirs that shape the
        outcome (status, truncation) are covered already."""
        return digest(
            {
                "v": HASH_VERSION,
                "kind": "result",
                "status": self.status.value,
                "exit_code": self.exit_code,
                "stdout_sha256": sha256_hex(self.stdout),
                "stderr_sha256": sha256_hex(self.stderr),
                "stdout_truncated": self.stdout_truncated,
                "stderr_truncated": self.stderr_truncated,
                "files": {
                    name: {"size": len(data), "sha256": sha256_hex(data)}
                    for name, data in self.files.items()
                },
                "files_truncated": self.files_truncated,
            }
        )

    @property
    def ok(self) -> bool:
        """True when the task exited with code 0."""
        return self.status is Status.SUCCEEDED

    @property
    def stdout_text(self) -> str:
        """Standard output decoded as UTF-8, undecodable bytes replaced."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        """Standard error decoded as UTF-8, undecodable bytes replaced."""
        return self.stderr.decode("utf-8", "replace")

    def to_error(self) -> SandboxError | None:
        """The exception that describes this result, or ``None`` when it succeeded."""
        message = self.error.message if self.error else ""
        match self.status:
            case Status.SUCCEEDED:
                return None
            case Status.FAILED:
                return TaskFailed(f"task exited with code {self.exit_code}", result=self)
            case Status.TIMEOUT:
                return ExecutionTimeout(message or "task timed out", result=self)
            case Status.RESOURCE_LIMIT:
                return ResourceLimitExceeded(
                    self.limit or "unknown", message or "resource limit exceeded", result=self
                )
            case Status.LAUNCH_FAILED:
                return LaunchFailed(message or "the task's program could not start", result=self)
            case _ if self.error and self.error.type == "InvalidInput":
                return InvalidInput(message, result=self)
            case _:
                return ExecutionError(message or "task failed to run", result=self)

    def raise_for_status(self) -> Result:
        """Raise the matching :class:`SandboxError` unless the task succeeded; else return self."""
        error = self.to_error()
        if error is not None:
            raise error
        return self

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: text streams (bad bytes replaced) and seconds as ``duration_s``."""
        return {
            "status": self.status.value,
            "exit_code": self.exit_code,
            "stdout": self.stdout_text,
            "stderr": self.stderr_text,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "duration_s": round(self.duration, 6),
            "limit": self.limit,
            "error": self.error.model_dump() if self.error else None,
            "files": {name: len(data) for name, data in self.files.items()},
            "files_truncated": self.files_truncated,
            "usage": self.usage.model_dump(),
            "runtime": self.runtime.model_dump() if self.runtime else None,
            "task_id": self.task_id,
            "labels": self.labels,
            "result_hash": self.result_hash,
            "spec_hash": self.spec_hash,
            "cached": self.cached,
            "events": [event.model_dump(mode="json") for event in self.events],
            **({"attempts": self.attempts} if self.attempts is not None else {}),
        }
