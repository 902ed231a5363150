"""The ``parity-sandbox`` command line: a thin adapter over the library.

Exit codes of ``parity-sandbox run`` (also with ``--json``):

==========  ==================================================================
task's own  the task exited; its exit code is passed through (0-255)
2           the command line itself is wrong (unknown option, missing target)
65          invalid input: the task, a limit or the configuration was rejected
122         the task's program never started (not found, not executable, no workdir)
123         the task hit a resource limit (memory, fuel, stack, disk, ...)
124         the task ran past its timeout and was killed
125         the runtime is unavailable here, or another sandbox error
126         the task crashed (a WebAssembly trap) or its worker died
130         interrupted (Ctrl-C); the task was stopped
==========  ==================================================================
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from parity_sandbox._batch import read_tasks
from parity_sandbox._batch import run_batch as run_batch_results
from parity_sandbox._cache import ResultCache, open_cache
from parity_sandbox._config import Config, check_backend, load_config
from parity_sandbox._egress import parse_grants
from parity_sandbox._exceptions import InvalidInput, RuntimeUnavailable, SandboxError
from parity_sandbox._executor import Executor
from parity_sandbox._executor import portable as make_portable
from parity_sandbox._fs import write_files
from parity_sandbox._models import MAX_STDIN_BYTES, Limits, Result, Status, Task
from parity_sandbox._record import Record
from parity_sandbox._record import verify as verify_record
from parity_sandbox.runtimes import PLANNED, executor_class
from parity_sandbox.runtimes import names as runtime_names

EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="parity-sandbox",
    help="Run untrusted compute tasks in a sandbox with hard limits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
image_app = typer.Typer(help="Manage Docker images offline.", no_args_is_help=True)
app.add_typer(image_app, name="image")
cache_app = typer.Typer(help="Inspect or empty the result cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
keys_app = typer.Typer(help="Manage the service's API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
audit_app = typer.Typer(help="Check or follow an audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
metrics_app = typer.Typer(help="Expose metrics for Prometheus.", no_args_is_help=True)
app.add_typer(metrics_app, name="metrics")
node_app = typer.Typer(
    help="Start or stop a Ray node that runs tasks (the ray extra).", no_args_is_help=True
)
app.add_typer(node_app, name="node")

_err = Console(stderr=True, highlight=False, soft_wrap=True)
_out = Console(highlight=False, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="YAML configuration file (default: $PARITY_SANDBOX_CONFIG).",
        dir_okay=False,
    ),
]


def _pairs(values: list[str], option: str) -> dict[str, str]:
    """Parse repeated ``KEY=VALUE`` options; an entry without ``=`` is refused, not guessed."""
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{option} {value!r}: expected KEY=VALUE", field=option)
        if key in pairs:
            raise InvalidInput(f"{option} {key!r} is given twice", field=option)
        pairs[key] = rest
    return pairs


def _count(value: str, option: str) -> int:
    if not value.isdigit():
        raise InvalidInput(f"{option} {value!r}: expected a count or 'all'", field=option)
    return int(value)


def _read_stdin(source: str | None) -> bytes:
    if source is None:
        return b""
    if source == "-":
        data = sys.stdin.buffer.read(MAX_STDIN_BYTES + 1)
    else:
        try:
            with Path(source).open("rb") as handle:
                data = handle.read(MAX_STDIN_BYTES + 1)
        except OSError as exc:
            raise InvalidInput(f"--stdin: cannot read {source}: {exc.strerror}") from None
    if len(data) > MAX_STDIN_BYTES:
        raise InvalidInput(f"--stdin: more than {MAX_STDIN_BYTES} bytes", field="stdin")
    return data


def _fail(error: SandboxError, as_json: bool) -> typer.Exit:
    """Report an error that left no result: one line, or one JSON object; never a traceback."""
    kind = type(error).__name__
    if as_json:
        document: dict[str, Any] = {
            "status": "error",
            "exit_code": None,
            "stdout": "",
            "stderr": "",
            "stdout_truncated": False,
            "stderr_truncated": False,
            "duration_s": 0.0,
            "limit": None,
            "error": {"type": kind, "message": error.message},
        }
        _out.print_json(json.dumps(document))
    else:
        _err.print(f"parity-sandbox: {kind}: {error.message}", markup=False)
    return typer.Exit(error.exit_code)


def _write_outputs(result: Result, output_dir: Path | None) -> str | None:
    """Write the result's files under ``output_dir``; a message if that failed."""
    if output_dir is None or not result.files:
        return None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_files(output_dir, result.files)
    except OSError as exc:
        return (
            f"--output-dir: cannot write {exc.filename or output_dir}: {exc.strerror} "
            "(existing files are never overwritten)"
        )
    return None


def _report(result: Result, as_json: bool, output_dir: Path | None) -> int:
    """Show a result the way ``run`` documents; returns the exit code.

    The task's output is shown even when its files cannot be written (nothing is lost); that
    failure then decides the exit code.
    """
    write_error = _write_outputs(result, output_dir)
    error = result.to_error()
    if as_json:
        _out.print_json(json.dumps(result.to_json_dict()))
    else:
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.buffer.flush()
        sys.stderr.buffer.write(result.stderr)
        sys.stderr.buffer.flush()
        for stream, cut in (
            ("stdout", result.stdout_truncated),
            ("stderr", result.stderr_truncated),
        ):
            if cut:
                _err.print(f"parity-sandbox: {stream} truncated at the output limit", markup=False)
        if result.files_truncated:
            _err.print("parity-sandbox: some output files were left out (caps)", markup=False)
        if error is not None and result.status is not Status.FAILED:
            _err.print(f"parity-sandbox: {type(error).__name__}: {error.message}", markup=False)
    if write_error is not None:
        _err.print(f"parity-sandbox: InvalidInput: {write_error}", markup=False)
        return InvalidInput.exit_code
    if result.status in (Status.SUCCEEDED, Status.FAILED):
        return result.exit_code or 0
    assert error is not None
    return error.exit_code


@app.command()
def run(
    target: Annotated[
        str | None,
        typer.Argument(
            help="The .wasm module to run (WASI preview 1); with --image, the command to run.",
            show_default=False,
        ),
    ] = None,
    args: Annotated[
        list[str] | None, typer.Argument(help="Arguments for the task (after --).")
    ] = None,
    runtime: Annotated[
        str | None, typer.Option(help="Runtime: wasm or docker (default: from config).")
    ] = None,
    remote: Annotated[
        str | None,
        typer.Option(
            help="Run on a parity-sandbox service at this URL (key: $PARITY_SANDBOX_API_KEY)."
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run on the Ray cluster at this address (HOST:PORT; extra [ray]).",
        ),
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(help="Docker image to run (implies --runtime docker); CMD ARGS after --."),
    ] = None,
    oci_runtime: Annotated[
        str | None,
        typer.Option(
            "--oci-runtime",
            "--docker-runtime",  # its old name
            help="OCI runtime of a Docker task: runc, or runsc for gVisor.",
        ),
    ] = None,
    gpus: Annotated[str | None, typer.Option(help="GPUs for a Docker task: N or all.")] = None,
    workdir: Annotated[
        str | None,
        typer.Option(help="Working directory (default /work; a WASM task's lies under /work)."),
    ] = None,
    invoke: Annotated[
        str | None,
        typer.Option(
            "--invoke",
            help="A WASM reactor's entry point: _initialize runs first, then this export; "
            "its integer result is the exit code.",
        ),
    ] = None,
    invoke_exit: Annotated[
        str | None,
        typer.Option("--invoke-exit", help="An export called with --invoke's exit code."),
    ] = None,
    user: Annotated[
        str | None, typer.Option(help="UID[:GID] of a Docker task (default 65534:65534).")
    ] = None,
    stdin: Annotated[
        str | None, typer.Option("--stdin", help="File to feed to the task's stdin; - for ours.")
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option("--input", help="NAME=PATH: host file PATH, read-only at /input/NAME."),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(help="Write collected output files here (paths relative to /work)."),
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="K=V for the task's environment.")
    ] = None,
    require: Annotated[
        list[str] | None,
        typer.Option(
            "--require",
            help="An output the task must leave (under /work/out); else it ends failed.",
        ),
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            help="HOST:PORT (or *.DOMAIN:PORT, CIDR:PORT) the task may reach; repeatable.",
        ),
    ] = None,
    memory: Annotated[str | None, typer.Option(help="Memory limit, e.g. 128m.")] = None,
    cpus: Annotated[str | None, typer.Option(help="CPU limit in cores, e.g. 0.5.")] = None,
    pids: Annotated[str | None, typer.Option(help="Process limit.")] = None,
    disk: Annotated[str | None, typer.Option(help="Workspace size limit, e.g. 64m.")] = None,
    timeout: Annotated[str | None, typer.Option(help="Wall-clock limit, e.g. 30s, 5m.")] = None,
    fuel: Annotated[str | None, typer.Option(help="WASM instruction budget.")] = None,
    stack_size: Annotated[str | None, typer.Option(help="WASM stack size, e.g. 1m.")] = None,
    output_limit: Annotated[
        str | None, typer.Option(help="Bytes kept of stdout and of stderr, e.g. 1m.")
    ] = None,
    open_files: Annotated[
        str | None, typer.Option(help="Open files per process (Docker; default 4096).")
    ] = None,
    file_size: Annotated[
        str | None, typer.Option(help="Largest file the task may write (default: --disk).")
    ] = None,
    output_files: Annotated[
        str | None, typer.Option(help="Output files collected at most (default 1000).")
    ] = None,
    input_limit: Annotated[
        str | None,
        typer.Option(help="Bytes of stdin and input files (default: half of --memory)."),
    ] = None,
    deterministic: Annotated[
        bool,
        typer.Option(help="WASM: same result on every machine (fuel, fixed clocks and random)."),
    ] = False,
    save: Annotated[
        Path | None,
        typer.Option(help="Write a run record (task and result) for `parity-sandbox verify`."),
    ] = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Run TARGET in the sandbox; its stdout and stderr pass through, its exit code too."""
    try:
        settings = load_config(config)
        limits = Limits(
            memory=memory,
            cpu=cpus,
            pids=pids,
            disk=disk,
            output=output_limit,
            timeout=timeout,
            fuel=fuel,
            stack_size=stack_size,
            open_files=open_files,
            file_size=file_size,
            output_files=output_files,
            input=input_limit,
        )
        common: dict[str, Any] = {
            "env": _pairs(env or [], "--env"),
            "input": _read_stdin(stdin),
            "input_files": {k: Path(v) for k, v in _pairs(inputs or [], "--input").items()},
            "limits": limits,
            "deterministic": deterministic,
            "network": {"allow": allow} if allow else None,
            "required_outputs": tuple(require or ()),
        }
        if image is not None or runtime == "docker":
            if image is None:
                raise InvalidInput("--runtime docker needs --image IMAGE", field="image")
            if invoke is not None or invoke_exit is not None:
                raise InvalidInput("--invoke: only for WebAssembly tasks", field="entry")
            command = None if target is None else (target, *(args or ()))
            task = Task(
                image=image,
                command=command,
                oci_runtime=oci_runtime,
                gpus=gpus if gpus in (None, "all") else _count(gpus, "--gpus"),
                workdir=workdir,
                user=user,
                runtime=runtime,
                **common,
            )
            runtime = "docker"
        else:
            if target is None:
                raise InvalidInput("give the .wasm module to run, or --image IMAGE", field="target")
            docker_only = [
                name
                for name, value in (
                    ("--oci-runtime", oci_runtime),
                    ("--gpus", gpus),
                    ("--user", user),
                )
                if value is not None
            ]
            if docker_only:
                raise InvalidInput(f"{', '.join(docker_only)}: only for Docker tasks (--image)")
            task = Task(
                wasm_file=Path(target),
                args=tuple(args or ()),
                runtime=runtime,
                workdir=workdir,
                entry=invoke,
                entry_exit=invoke_exit,
                **common,
            )
        with _executor_for(runtime or settings.default_runtime, settings, remote, ray) as executor:
            try:
                result = executor.execute(task)
            except SandboxError as exc:
                if exc.result is None:
                    raise
                result = exc.result
            if save is not None:
                _save_record(executor, task, result, save)
            code = _report(result, as_json, output_dir)
    except SandboxError as exc:
        raise _fail(exc, as_json) from None
    except KeyboardInterrupt:
        _err.print("parity-sandbox: interrupted; the task was stopped", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(code)


@app.command("run-batch")
def run_batch(
    tasks_file: Annotated[
        Path,
        typer.Argument(
            help="JSON lines, one task each, in the record form (bytes and files as base64).",
            dir_okay=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Results file (default: stdout).", dir_okay=False),
    ] = None,
    parallel: Annotated[
        int | None, typer.Option(min=1, max=1024, help="Tasks at once (default: 2 per core).")
    ] = None,
    warm_pool: Annotated[
        bool, typer.Option("--warm-pool", help="Start Docker containers ahead of the tasks.")
    ] = False,
    remote: Annotated[
        str | None,
        typer.Option(
            help="Run on a parity-sandbox service at this URL (key: $PARITY_SANDBOX_API_KEY)."
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run on the Ray cluster at this address (HOST:PORT; extra [ray]).",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Run a file of tasks; write one JSON Result per line, in the order of the tasks.

    Exit status: 0 when every task succeeded, 1 when any did not (each has its result line),
    65 for a file that cannot be read, 130 on Ctrl-C (what still ran was stopped).
    """
    try:
        settings = load_config(config)
        if warm_pool:
            pool = settings.docker.pool.model_copy(update={"enabled": True})
            docker = settings.docker.model_copy(update={"pool": pool})
            settings = settings.model_copy(update={"docker": docker})
        try:
            with tasks_file.open("rb") as handle:
                total = sum(1 for line in handle if line.strip())
            source = tasks_file.open("rb")
        except OSError as exc:
            raise InvalidInput(f"cannot read {tasks_file}: {exc.strerror}", field="tasks") from None
        sink = output.open("w", encoding="utf-8") if output is not None else sys.stdout
        code = 0
        progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} not ok"),
            TimeElapsedColumn(),
            console=_err,
            transient=False,
        )
        batch = run_batch_results(
            read_tasks(source),
            settings,
            max_parallel=parallel,
            make_executor=lambda name: _executor_for(name, settings, remote, ray),
        )
        try:
            with progress:
                bar = progress.add_task("tasks", total=total, failed=0)
                failed = 0
                for result in batch:
                    sink.write(result.to_json() + "\n")
                    sink.flush()
                    if result.status is not Status.SUCCEEDED:
                        failed += 1
                        code = 1
                    progress.update(bar, advance=1, failed=failed)
        finally:
            batch.close()  # at once on Ctrl-C: stops what runs, closes the executors
            source.close()
            if output is not None:
                sink.close()
    except SandboxError as exc:
        raise _fail(exc, False) from None
    except KeyboardInterrupt:
        _err.print(
            "parity-sandbox: interrupted; the tasks still running were stopped", markup=False
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(code)


def _executor_for(
    runtime: str, settings: Config, remote: str | None, ray: str | None = None
) -> Executor:
    """The executor a command runs on: the runtime's here, a service's (``--remote``), or a
    Ray cluster's (``--ray``)."""
    if remote is not None and ray is not None:
        raise InvalidInput("--remote and --ray: give one of them", field="--ray")
    if ray is not None:
        try:
            from parity_sandbox.cluster.executor import RayExecutor
        except ImportError as exc:
            raise RuntimeUnavailable(str(exc)) from None
        return RayExecutor(ray, config=settings)
    if remote is None:
        return executor_class(runtime)(settings)
    try:
        from parity_sandbox.remote import RemoteExecutor
    except ImportError as exc:
        raise RuntimeUnavailable(str(exc)) from None
    return RemoteExecutor(remote, config=settings)


def _save_record(executor: Executor, task: Task, result: Result, path: Path) -> None:
    image_id = result.runtime.image_id if result.runtime else None
    portable = make_portable(task, executor.config, image_id=image_id)
    record = Record(portable, executor.spec_hash(portable), result)
    try:
        record.save(path)
    except OSError as exc:
        raise InvalidInput(f"--save: cannot write {path}: {exc.strerror}", field="save") from None


@app.command()
def verify(
    record_file: Annotated[Path, typer.Argument(help="A run record written by run --save.")],
    config: ConfigOption = None,
) -> None:
    """Re-run the task a record holds and compare result hashes: exit 0 on a match, 1 if not."""
    try:
        settings = load_config(config)
        record = Record.load(record_file)
        runtime = record.task.runtime_name or "wasm"
        with executor_class(runtime)(settings) as executor:
            outcome = verify_record(record, executor)
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None
    except KeyboardInterrupt:
        _err.print("parity-sandbox: interrupted; the task was stopped", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if outcome.matched:
        _out.print(f"match {outcome.actual}", markup=False)
        return
    recorded, now = record.result, outcome.result
    _out.print(
        f"MISMATCH recorded {outcome.expected} ({recorded.status.value}, exit "
        f"{recorded.exit_code}), got {outcome.actual} ({now.status.value}, exit {now.exit_code})",
        markup=False,
    )
    if not (record.task.deterministic or record.task.cacheable):
        _err.print(
            "parity-sandbox: warning: the task is neither deterministic nor cacheable; its "
            "output may differ from run to run",
            markup=False,
        )
    raise typer.Exit(1)


@contextlib.contextmanager
def _opened_cache(config: Path | None) -> Iterator[ResultCache]:
    cache = open_cache(load_config(config))
    if cache is None:
        raise InvalidInput("the result cache is disabled (cache.enabled: false)", field="cache")
    try:
        yield cache
    finally:
        cache.close()


@cache_app.command("stats")
def cache_stats(config: ConfigOption = None) -> None:
    """Say where the result cache is, what it holds and how often it was hit."""
    try:
        with _opened_cache(config) as cache:
            stats = cache.stats()
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None
    _out.print(
        f"backend: {stats.backend}\nlocation: {stats.location}\nentries: {stats.entries}\n"
        f"bytes: {stats.bytes} (bound {stats.max_bytes})\nhits: {stats.hits}\n"
        f"misses: {stats.misses}",
        markup=False,
    )


@cache_app.command("clear")
def cache_clear(config: ConfigOption = None) -> None:
    """Remove every entry of the result cache."""
    try:
        with _opened_cache(config) as cache:
            removed = cache.clear()
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None
    _out.print(f"removed {removed} cached result(s)", markup=False)


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration (file, environment and defaults) as YAML."""
    try:
        settings = load_config(config)
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None
    _out.print(yaml.safe_dump(settings.to_document(), sort_keys=False).rstrip(), markup=False)


@audit_app.command("verify")
def audit_verify(
    files: Annotated[
        list[Path],
        typer.Argument(help="The log's files in order, rotated ones first (PATH.* PATH)."),
    ],
    after: Annotated[
        str | None,
        typer.Option(help="Hash of the entry before the first file's first (older files gone)."),
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(help="A hash noted elsewhere (a sink's copy) that must be in the log."),
    ] = None,
) -> None:
    """Check an audit log's hash chain: exit 0 if it holds, 1 naming the first broken entry."""
    from parity_sandbox.audit import verify_chain

    check = verify_chain(files, after=after, head=head)
    if check.torn is not None:
        path, line = check.torn
        _err.print(
            f"parity-sandbox: warning: {path}:{line}: a last line cut short (its writer was "
            "killed mid-write); the entries before it verify",
            markup=False,
        )
    if check.broken is not None:
        broken = check.broken
        where = f"{broken.file}:{broken.line}" if broken.line else str(broken.file)
        _out.print(
            f"BROKEN {where}: {broken.reason} ({check.entries} entries verified before it)",
            markup=False,
        )
        raise typer.Exit(1)
    _out.print(f"ok {check.entries} entries; head {check.head or '-'}", markup=False)


@audit_app.command("tail")
def audit_tail(
    file: Annotated[Path, typer.Argument(help="The audit log file.")],
    lines: Annotated[int, typer.Option("-n", "--lines", min=0, help="Entries shown.")] = 10,
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep printing entries as they come.")
    ] = False,
) -> None:
    """Print the last entries of an audit log, one JSON object a line; -f follows it (also
    across rotations)."""
    from parity_sandbox.audit import read_entries

    try:
        shown = list(read_entries(file))
    except OSError as exc:
        error = InvalidInput(f"cannot read {file}: {exc.strerror}", field="file")
        raise _fail(error, as_json=False) from None
    for entry in shown[len(shown) - lines :] if lines else []:
        _out.print(_entry_line(entry), markup=False)
    if not follow:
        return
    try:
        _follow(file, file.stat().st_ino, file.stat().st_size)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _entry_line(entry: dict[str, Any] | bytes) -> str:
    """An entry as one line of ASCII: a line that is no entry (a damaged log) is escaped too,
    so nothing in a log can drive the terminal."""
    if isinstance(entry, bytes):
        return "unreadable line: " + ascii(entry)
    return json.dumps(entry, sort_keys=True, ensure_ascii=True)


def _follow(file: Path, inode: int, offset: int) -> None:
    """Print entries appended to ``file`` from ``offset`` on, and those of the file that
    replaces it when it is rotated."""
    import time

    pending = b""
    while True:
        try:
            info = file.stat()
        except FileNotFoundError:
            time.sleep(0.2)
            continue
        if info.st_ino != inode:  # rotated: the new file from its start
            inode, offset, pending = info.st_ino, 0, b""
        if info.st_size > offset:
            with file.open("rb") as handle:
                handle.seek(offset)
                data = handle.read(info.st_size - offset)
            offset += len(data)
            pending += data
            *whole, pending = pending.split(b"\n")
            for raw in whole:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    entry = raw
                _out.print(_entry_line(entry if isinstance(entry, dict) else raw), markup=False)
        else:
            time.sleep(0.2)


@app.command()
def reap(config: ConfigOption = None) -> None:
    """Remove containers and volumes that crashed runs left behind (by their labels)."""
    from parity_sandbox.runtimes.docker.executor import DockerExecutor

    try:
        with DockerExecutor(load_config(config), reap=False) as executor:
            removed = executor.reap()
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None
    _out.print(f"removed {removed} leftover object(s)", markup=False)


@image_app.command("import")
def image_import(
    rootfs: Annotated[Path, typer.Argument(help="A .tar of a root filesystem.")],
    name: Annotated[str, typer.Argument(help="NAME[:TAG] to give the image.")],
    env: Annotated[
        list[str] | None,
        typer.Option("--env", help="K=V baked into the image (default: a standard PATH)."),
    ] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="K=V image label.")] = None,
    config: ConfigOption = None,
) -> None:
    """Make a Docker image from a root filesystem tarball, without any registry."""
    from parity_sandbox.runtimes.docker.executor import DockerExecutor

    try:
        with DockerExecutor(load_config(config), reap=False) as executor:
            image_id = executor.import_image(
                rootfs,
                name,
                env=_pairs(env, "--env") if env else None,
                labels=_pairs(label or [], "--label"),
            )
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None
    _out.print(f"{name} {image_id}", markup=False)


@app.command()
def doctor(config: ConfigOption = None) -> None:
    """Say which runtimes are usable here and, for each that is not, why and how to fix it."""
    try:
        settings = load_config(config)
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None
    table = Table(title="parity-sandbox runtimes")
    table.add_column("runtime")
    table.add_column("usable")
    table.add_column("details / fix")
    usable: dict[str, bool] = {}
    for name in sorted({*runtime_names(), *PLANNED}):
        try:
            usable[name], detail = executor_class(name).diagnose(settings)
        except SandboxError as exc:
            usable[name], detail = False, exc.message
        table.add_row(name, "yes" if usable[name] else "no", detail)
    _out.print(table)
    cache = settings.resolved_cache_dir() / "wasm-modules"
    if usable.get("wasm"):
        from parity_sandbox.runtimes.wasm.worker import private_dir

        state = "in use" if private_dir(cache) else "NOT used: others can write to it (chmod 700)"
        _out.print(f"compiled-module cache: {cache} ({state})", markup=False)
    default = settings.default_runtime
    if not usable.get(default):
        _err.print(
            f"parity-sandbox: the default runtime {default!r} is not usable; fix it as the "
            "table says, or set default_runtime: wasm (PARITY_SANDBOX_DEFAULT_RUNTIME=wasm)",
            markup=False,
        )
        raise typer.Exit(1)


SERVICE_HINT = "the service needs the [service] extra: pip install 'parity-sandbox[service]'"


def _audit_action(config: Path | None, action: str, **fields: Any) -> None:
    """Write ``action`` to the audit log the configuration names, if any."""
    from parity_sandbox.audit import open_audit

    try:
        log = open_audit(load_config(config).audit)
        if log is not None:
            with log:
                log.record(action, **fields)
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None


@contextlib.contextmanager
def _service_store(config: Path | None) -> Iterator[Any]:
    """The service's store, opened and migrated (for ``keys``)."""
    try:
        from parity_sandbox.service.server import open_store
    except ImportError as exc:
        _err.print(f"parity-sandbox: {SERVICE_HINT} ({exc})", markup=False)
        raise typer.Exit(2) from None
    try:
        store = open_store(load_config(config))
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None
    try:
        yield store
    finally:
        store.close()


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: service.host).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on (default: service.port).")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="Where tasks run: local, or ray://HOST:PORT (a Ray cluster; default: "
            "service.backend)."
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Run the HTTP API (extra [service]) until SIGINT or SIGTERM."""
    try:
        from parity_sandbox.service.server import serve as run_server
    except ImportError as exc:
        _err.print(f"parity-sandbox: {SERVICE_HINT} ({exc})", markup=False)
        raise typer.Exit(2) from None
    try:
        settings = load_config(config)
        if port is not None and not 0 <= port <= 65535:
            raise InvalidInput("--port: 0 to 65535", field="--port")
        if backend is not None:
            try:
                service = settings.service.model_copy(update={"backend": check_backend(backend)})
            except ValueError as exc:
                raise InvalidInput(f"--backend: {exc}", field="--backend") from None
            settings = settings.model_copy(update={"service": service})
        run_server(settings, host=host, port=port)
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A name for the key (its owner, its use).")],
    admin: Annotated[bool, typer.Option(help="The key sees every key's tasks.")] = False,
    max_active: Annotated[
        int | None,
        typer.Option(help="Tasks queued and running at once (default: the service's)."),
    ] = None,
    max_memory: Annotated[
        str | None, typer.Option(help="Cap on a task's memory, e.g. 512m.")
    ] = None,
    max_timeout: Annotated[
        str | None, typer.Option(help="Cap on a task's timeout, e.g. 60s.")
    ] = None,
    max_cpus: Annotated[
        str | None, typer.Option(help="Cap on a task's CPU limit in cores.")
    ] = None,
    max_disk: Annotated[
        str | None, typer.Option(help="Cap on a task's disk limit, e.g. 1g.")
    ] = None,
    runtimes: Annotated[
        list[str] | None, typer.Option("--runtime", help="A runtime it may use (repeatable).")
    ] = None,
    images: Annotated[
        list[str] | None,
        typer.Option("--image", help="An image pattern (fnmatch) it may run (repeatable)."),
    ] = None,
    cpu_seconds_per_day: Annotated[
        float | None, typer.Option(help="CPU seconds its tasks may use per UTC day.")
    ] = None,
    network: Annotated[
        list[str] | None,
        typer.Option(
            "--network",
            help="Egress its tasks may be granted: a grant such as HOST:PORT (repeatable), "
            "or any; without it, none.",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Make an API key and print it, once: the store keeps only its hash."""
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise _fail(InvalidInput("NAME: 1 to 64 printable characters", field="name"), False)
    if max_active is not None and max_active < 1:
        raise _fail(InvalidInput("--max-active: at least 1", field="--max-active"), False)
    try:
        capped = Limits(memory=max_memory, timeout=max_timeout, cpu=max_cpus, disk=max_disk)
        if cpu_seconds_per_day is not None and cpu_seconds_per_day <= 0:
            raise InvalidInput("--cpu-seconds-per-day: more than 0", field="--cpu-seconds-per-day")
        unknown = sorted(set(runtimes or ()) - set(runtime_names()))
        if unknown:
            raise InvalidInput(f"--runtime: no runtime {', '.join(unknown)}", field="--runtime")
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None
    caps: dict[str, Any] = {
        name: getattr(capped, name)
        for name in ("memory", "timeout", "cpu", "disk")
        if getattr(capped, name) is not None
    }
    if runtimes:
        caps["runtimes"] = sorted(set(runtimes))
    if images:
        caps["images"] = list(images)
    if network:
        try:
            caps["network"] = (
                ["any"] if network == ["any"] else [str(g) for g in parse_grants(network)]
            )
        except ValueError as exc:
            raise _fail(InvalidInput(f"--network: {exc}", field="--network"), False) from None
    with _service_store(config) as store:
        if any(key.name == name for key in store.list_keys()):
            raise _fail(InvalidInput(f"a key named {name!r} exists", field="name"), False)
        secret = store.create_key(
            name,
            admin=admin,
            max_active=max_active,
            caps=caps,
            cpu_seconds_per_day=cpu_seconds_per_day,
        )
        made = next(key for key in store.list_keys() if key.name == name)
    _audit_action(
        config,
        "key_created",
        who=None,
        via="cli",
        key_id=made.id,
        name=name,
        admin=admin,
        max_active=max_active,
        caps=caps,
        cpu_seconds_per_day=cpu_seconds_per_day,
    )
    _out.print(secret, markup=False)


@keys_app.command("list")
def keys_list(config: ConfigOption = None) -> None:
    """List the keys (never the keys themselves)."""
    import datetime

    table = Table(title="API keys")
    for column in ("name", "admin", "max active", "created", "revoked"):
        table.add_column(column)

    def when(stamp: float | None) -> str:
        if stamp is None:
            return ""
        return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M")

    with _service_store(config) as store:
        for key in store.list_keys():
            table.add_row(
                key.name,
                "yes" if key.admin else "",
                str(key.max_active or ""),
                when(key.created_at),
                when(key.revoked_at),
            )
    _out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    config: ConfigOption = None,
) -> None:
    """Revoke a key: its next request is refused (401)."""
    with _service_store(config) as store:
        if not store.revoke_key(name):
            raise _fail(InvalidInput(f"no live key named {name!r}", field="name"), False)
        revoked = next(key for key in store.list_keys() if key.name == name)
    _audit_action(config, "key_revoked", who=None, via="cli", key_id=revoked.id, name=name)
    _out.print(f"revoked {name}", markup=False)


@metrics_app.command("serve")
def metrics_serve(
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="The multiprocess directory the runs write to (default: "
            "$PROMETHEUS_MULTIPROC_DIR).",
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 9464,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Serve, on /metrics, the metrics of every process that writes to a multiprocess
    directory: batch runs started with PROMETHEUS_MULTIPROC_DIR=DIR and metrics.enabled
    (PARITY_SANDBOX_METRICS_ENABLED=true). Runs until Ctrl-C."""
    import http.server
    import os

    from parity_sandbox.metrics import MULTIPROC_ENV, multiprocess_exposition

    named = os.environ.get(MULTIPROC_ENV)
    where = directory or (Path(named) if named else None)
    if where is None or not where.is_dir():
        raise _fail(
            InvalidInput(
                f"--dir: a directory the runs write to (or set {MULTIPROC_ENV})", field="--dir"
            ),
            as_json=False,
        )
    if not 0 <= port <= 65535:
        raise _fail(InvalidInput("--port: 0 to 65535", field="--port"), as_json=False)
    try:
        multiprocess_exposition(str(where))  # fails now if prometheus_client is missing
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            body, content_type = multiprocess_exposition(str(where))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: no access log
            pass

    with http.server.ThreadingHTTPServer((host, port), Handler) as server:
        _err.print(
            f"serving the metrics of {where} on http://{host}:{server.server_port}/metrics",
            markup=False,
        )
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


def _cluster_nodes() -> Any:
    """``parity_sandbox.cluster.node``, or exit 2 saying how to install the ``ray`` extra."""
    try:
        from parity_sandbox.cluster import node
    except ImportError as exc:
        _err.print(f"parity-sandbox: pip install 'parity-sandbox[ray]' ({exc})", markup=False)
        raise typer.Exit(2) from None
    return node


def _ray_state_dir(settings: Config) -> Path:
    return settings.service.resolved_state_dir() / "ray"


@node_app.command("start")
def node_start(
    address: Annotated[
        str | None,
        typer.Option(help="The head's address, HOST:PORT (with --head: default NODE_IP:PORT)."),
    ] = None,
    head: Annotated[bool, typer.Option("--head", help="Start the cluster's head.")] = False,
    port: Annotated[int, typer.Option(min=1, max=65535, help="The head's port.")] = 6379,
    node_ip: Annotated[
        str, typer.Option(help="The address this node listens on (loopback by default).")
    ] = "127.0.0.1",
    name: Annotated[
        str | None, typer.Option(help="A name for this node (default: random).")
    ] = None,
    temp_dir: Annotated[
        Path | None,
        typer.Option(help="Ray's directory for this node (default: /tmp/psbray-NAME)."),
    ] = None,
    num_cpus: Annotated[int | None, typer.Option(min=0, help="CPUs to offer.")] = None,
    gpus: Annotated[
        int | None, typer.Option(min=0, help="GPUs to offer (default: probed).")
    ] = None,
    runtime: Annotated[
        list[str] | None, typer.Option(help="Offer only this runtime (repeatable).")
    ] = None,
    oci_runtime: Annotated[
        list[str] | None, typer.Option(help="Offer only this OCI runtime (repeatable).")
    ] = None,
    ports_from: Annotated[
        int | None,
        typer.Option(min=1024, max=65435, help="Use ports PORTS_FROM+1 to +99 (default: Ray's)."),
    ] = None,
    failure_after: Annotated[
        float,
        typer.Option(min=0.5, max=600, help="Head: seconds before a silent node counts as dead."),
    ] = 5.0,
    token_file: Annotated[
        Path | None,
        typer.Option(help="The cluster's token (default: ray.token_file, else Ray's own)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Start a Ray node that advertises what it can run, with its agent.

    The node keeps running after this command returns; `parity-sandbox node stop` stops it.
    """
    nodes = _cluster_nodes()
    try:
        settings = load_config(config)
        if token_file is not None:
            settings = settings.model_copy(
                update={"ray": settings.ray.model_copy(update={"token_file": token_file})}
            )
        if address is None:
            if not head:
                raise InvalidInput("--address HOST:PORT of the head (or --head)", field="address")
            address = f"{node_ip}:{port}"
        name = name or secrets.token_hex(4)
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", name):
            raise InvalidInput("--name: 1 to 32 of A-Z, a-z, 0-9, _ and -", field="--name")
        state = nodes.start(
            address,
            head=head,
            name=name,
            node_ip=node_ip,
            temp_dir=temp_dir or Path(f"/tmp/psbray-{name}"),
            state_dir=_ray_state_dir(settings),
            config=settings,
            num_cpus=num_cpus,
            gpus=gpus,
            ports_from=ports_from,
            runtimes=runtime,
            oci_runtimes=oci_runtime,
            failure_after=failure_after,
        )
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None
    offers = ", ".join(f"{k}={v:g}" for k, v in sorted(state.resources.items()))
    print(f"node {state.name} ({state.node_id}) joined {state.address}, pid {state.pid}")
    print(f"offers: {offers}")
    print(f"stop it with: parity-sandbox node stop --name {state.name}")


@node_app.command("stop")
def node_stop(
    name: Annotated[
        str | None, typer.Option(help="The node to stop (default: every node started here).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Stop the nodes `node start` started on this host: their processes, by PID."""
    nodes = _cluster_nodes()
    try:
        stopped = nodes.stop(_ray_state_dir(load_config(config)), name)
    except SandboxError as exc:
        raise _fail(exc, as_json=False) from None
    for state in stopped:
        print(f"stopped node {state.name} (pid {state.pid})")
    if name is not None and not stopped:
        _err.print(f"parity-sandbox: no node {name} was started here", markup=False)
        raise typer.Exit(1)


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    _err.print(f"parity-sandbox: warning: {message}", markup=False)


def main() -> None:
    """Console-script entry point."""
    warnings.showwarning = _one_line_warning
    app()


if __name__ == "__main__":
    main()
