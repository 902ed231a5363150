import inspect
import subprocess
import sys
import typing

import pydantic

import parity_sandbox


def test_all_is_sorted_and_importable() -> None:
    names = parity_sandbox.__all__
    assert names == sorted(names)
    for name in names:
        assert getattr(parity_sandbox, name) is not None


def test_errors_share_one_base() -> None:
    for name in (
        "InvalidInput",
        "RuntimeUnavailable",
        "ExecutionTimeout",
        "ResourceLimitExceeded",
        "ExecutionError",
        "TaskFailed",
    ):
        assert issubclass(getattr(parity_sandbox, name), parity_sandbox.SandboxError)


def test_cli_exit_codes_are_distinct() -> None:
    codes = {
        cls.exit_code
        for cls in (
            parity_sandbox.InvalidInput,
            parity_sandbox.ExecutionTimeout,
            parity_sandbox.ResourceLimitExceeded,
            parity_sandbox.ExecutionError,
            parity_sandbox.RuntimeUnavailable,
        )
    }
    assert len(codes) == 5


def _annotations(obj: object) -> list[object]:
    """The type hints of ``obj``: a function's, or a class's fields and own public methods."""
    namespace = {name: getattr(parity_sandbox, name) for name in parity_sandbox.__all__}
    # names the modules import for type checking only
    namespace |= {"BaseModel": pydantic.BaseModel, "ValidationError": pydantic.ValidationError}
    if inspect.isfunction(obj):
        return list(typing.get_type_hints(obj, localns=namespace).values())
    if not inspect.isclass(obj):
        return []  # __version__
    found: list[object] = []
    fields = getattr(obj, "model_fields", None)
    if isinstance(fields, dict):  # a pydantic model: its fields, not BaseModel's machinery
        found += [field.annotation for field in fields.values()]
    else:
        found += typing.get_type_hints(obj, localns=namespace).values()
    for name, member in inspect.getmembers(obj):
        if (name.startswith("_") and name != "__init__") or not callable(member):
            continue
        if not (getattr(member, "__module__", None) or "").startswith("parity_sandbox"):
            continue  # inherited from pydantic, Exception, ...
        found += typing.get_type_hints(member, localns=namespace).values()
    return found


def _classes_in(hint: object) -> set[type]:
    if inspect.isclass(hint) and not typing.get_args(hint):
        return {hint}
    classes: set[type] = set()
    origin = typing.get_origin(hint)
    if inspect.isclass(origin):
        classes.add(origin)
    for arg in typing.get_args(hint):
        classes |= _classes_in(arg)
    return classes


def test_every_name_reachable_from_the_public_api_is_exported() -> None:
    """A type that a public signature or field uses must be importable from the package."""
    missing: dict[str, str] = {}
    seen: set[type] = set()
    pending = [getattr(parity_sandbox, name) for name in parity_sandbox.__all__]
    while pending:
        obj = pending.pop()
        for hint in _annotations(obj):
            for cls in _classes_in(hint):
                if cls in seen or not cls.__module__.startswith("parity_sandbox"):
                    continue
                seen.add(cls)
                pending.append(cls)
                if getattr(parity_sandbox, cls.__name__, None) is not cls:
                    missing[cls.__name__] = f"{cls.__module__} (used by {obj!r})"
    assert missing == {}
    assert seen  # the walk found the package's own types


def test_the_package_root_imports_nothing_before_it_is_used() -> None:
    """``import parity_sandbox`` is light, and a WASM worker, which imports one module of the
    package, loads neither pydantic, YAML, SQLite nor the Docker SDK."""
    assert set(parity_sandbox._WHERE) == set(parity_sandbox.__all__) - {"__version__"}
    code = (
        "import sys\n"
        "import parity_sandbox\n"
        "light = set(sys.modules)\n"
        "import parity_sandbox.runtimes.wasm.worker\n"
        "heavy = ('pydantic', 'yaml', 'sqlite3', 'docker', 'typer', 'rich', 'requests')\n"
        "print([name for name in heavy if name in sys.modules])\n"
        "print([name for name in heavy if name in light])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "[]"]
