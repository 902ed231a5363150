"""What the cluster modules share: Ray imported (or a clear error), a connection to a cluster,
and the names by which nodes advertise what they can run.

Capabilities are Ray resources a node is started with (``parity-sandbox node start`` probes
them): ``psb_runtime_<name>`` for each runtime that works there (``wasm``, ``docker``),
``psb_oci_<name>`` for each OCI runtime its Docker daemon has (``runc``, ``runsc``), Ray's
own ``GPU`` for its GPUs and ``memory`` for its memory. A task asks for those it needs, so Ray
places it only on a node that has them and reserves its memory there.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import ray
    from ray._private import services as _services
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"running tasks on Ray needs ray: pip install 'parity-sandbox[ray]' ({exc})"
    ) from exc

from parity_sandbox._exceptions import RuntimeUnavailable

__all__ = ["NAMESPACE", "RUNTIME_PREFIX", "agent_name", "connect", "disconnect", "ray"]

#: The Ray namespace of the node agents.
NAMESPACE = "parity_sandbox"
#: How much of a capability each node advertises: tasks ask for 1 (capabilities are not used up).
PLENTY = 1_000_000
RUNTIME_PREFIX = "psb_runtime_"
OCI_PREFIX = "psb_oci_"

_connected = 0
#: Whether ``connect`` made this process's connection (and so the last ``disconnect`` ends it).
_owned = False
_connect_lock = threading.Lock()
_patch_lock = threading.Lock()


def runtime_resource(name: str) -> str:
    return f"{RUNTIME_PREFIX}{name}"


def oci_resource(name: str) -> str:
    return f"{OCI_PREFIX}{name}"


def agent_name(node_id: str) -> str:
    """The name of the agent actor of the node ``node_id`` (in ``NAMESPACE``)."""
    return f"agent-{node_id}"


def is_loopback(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return host == "localhost"


def host_of(address: str) -> str:
    host, _, _ = address.rpartition(":")
    return host or address


@contextlib.contextmanager
def loopback_kept() -> Iterator[None]:
    """While this runs, Ray keeps a loopback address as given.

    Ray 2.60 turns ``127.0.0.1`` into the host's outside address wherever it is given (a
    node's address, a cluster's), and its servers then listen on every interface; kept as
    loopback, they listen on loopback only. An outside address is left to Ray.
    """
    original = _services.resolve_ip_for_localhost

    def resolve(host: str) -> Any:
        return host if is_loopback(host) else original(host)

    with _patch_lock:
        _services.resolve_ip_for_localhost = resolve
        try:
            yield
        finally:
            _services.resolve_ip_for_localhost = original


def use_token(token_file: Path | None) -> None:
    """Make this process (and those it starts) authenticate to the cluster with the token in
    ``token_file`` (Ray's token authentication); without one, Ray's own default applies
    (``$RAY_AUTH_TOKEN_PATH``, ``$RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``)."""
    if token_file is None:
        return
    if not token_file.is_file():
        raise RuntimeUnavailable(f"ray.token_file: {token_file} is not a file")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    # Ray read its configuration when it was imported: have it read these again.
    with contextlib.suppress(ImportError, AttributeError):
        from ray._raylet import (  # type: ignore[attr-defined]
            AuthenticationTokenLoader,
            Config,
        )

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def connect(address: str, token_file: Path | None = None) -> None:
    """Connect this process to the cluster at ``address`` (``HOST:PORT``), once per process;
    each call is undone by one ``disconnect``. A process connected to a cluster already
    keeps that connection (and ``disconnect`` leaves it).

    Raises:
        RuntimeUnavailable: the cluster cannot be reached (or refused the token).
    """
    global _connected, _owned
    with _connect_lock:
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            if current.rpartition(":")[2] != address.rpartition(":")[2]:
                raise RuntimeUnavailable(
                    f"this process is connected to the Ray cluster at {current}, not to "
                    f"{address} (a process has one Ray connection)"
                )
            _connected += 1
            return
        use_token(token_file)
        options: dict[str, Any] = {}
        if is_loopback(host_of(address)):
            options["_node_ip_address"] = "127.0.0.1"
        try:
            with loopback_kept():
                ray.init(
                    address=address,
                    namespace=NAMESPACE,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    configure_logging=False,
                    **options,
                )
        except Exception as exc:  # Ray raises many kinds: ConnectionError, RuntimeError, ...
            raise RuntimeUnavailable(
                f"cannot connect to the Ray cluster at {address}: {exc}"
            ) from exc
        _connected += 1
        _owned = True


def disconnect() -> None:
    """Undo one ``connect`` that made the connection; the last one shuts Ray down here."""
    global _connected, _owned
    with _connect_lock:
        _connected = max(0, _connected - 1)
        if _connected == 0 and _owned:
            _owned = False
            ray.shutdown()
