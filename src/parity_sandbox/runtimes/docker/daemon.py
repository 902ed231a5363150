"""Access to the Docker daemon: errors mapped to ours, best-effort calls, and removals.

- :func:`docker_errors` maps the SDK's and requests' errors to ours (a lost daemon is
  ``RuntimeUnavailable``, a request Docker refused is ``InvalidInput``);
  :func:`close_failed_connects` closes what docker-py leaves open behind a failed connect.
- :func:`remove_container` removes a container and its volumes, warning (for a later reap)
  when it cannot; :func:`let_init_exit` lets a finished container's init exit.
"""

from __future__ import annotations

import contextlib
import socket
import time
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import docker
import docker.errors
import requests.exceptions

from parity_sandbox._exceptions import InvalidInput, RuntimeUnavailable, SandboxError

#: Seconds any one Engine API call may take before the daemon counts as unresponsive.
API_TIMEOUT = 30
#: Seconds to wait for the exit status of a container that died on its own.
EXIT_TIMEOUT = 10
#: Seconds the daemon gets to pass init the signal that lets it exit.
NUDGE_TIMEOUT = 5
#: Seconds a removal the daemon is still carrying out (after our request timed out) is
#: waited for before the container is left to ``reap``.
REMOVE_GRACE = 90
DAEMON_HINT = "start it (dockerd) or point docker.base_url / DOCKER_HOST at a running daemon"


def split_reference(reference: str) -> tuple[str, str]:
    """``name[:tag][@digest]`` -> (name, tag or digest); a registry port is not a tag."""
    if "@" in reference:
        name, _, digest = reference.partition("@")
        return name.rpartition(":")[0] if ":" in name.rsplit("/", 1)[-1] else name, digest
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:
        return reference, "latest"
    return name, tag


def inspect_image(api: docker.APIClient, reference: str) -> dict[str, Any]:
    details: dict[str, Any] = api.inspect_image(reference)  # type: ignore[no-untyped-call]
    return details


def close_failed_connects(exc: BaseException) -> None:
    """Close the sockets of connections that failed to connect behind ``exc``.

    docker-py's ``UnixHTTPConnection.connect`` leaves the socket of a failed connect (a lost
    daemon) to the garbage collector, and so a ResourceWarning: it is still a local of the
    ``connect`` frames in the exception's tracebacks, where it is closed here.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        pending += [error.__cause__, error.__context__]
        trace = error.__traceback__
        while trace is not None:
            frame = trace.tb_frame
            sock = frame.f_locals.get("sock") if frame.f_code.co_name == "connect" else None
            if isinstance(sock, socket.socket):
                sock.close()
            trace = trace.tb_next


@contextlib.contextmanager
def best_effort() -> Iterator[None]:
    """Suppress any error of a call whose failure changes nothing (a removal that ``reap``
    repeats later), without leaking what a failed connect left open."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - best effort by definition
        close_failed_connects(exc)


@contextlib.contextmanager
def docker_errors(what: str) -> Iterator[None]:
    """Map the SDK's and requests' errors to ours: a lost daemon is ``RuntimeUnavailable``."""
    try:
        yield
    except SandboxError:
        raise
    except docker.errors.APIError as exc:
        explanation = exc.explanation or str(exc)
        if isinstance(explanation, bytes):
            explanation = explanation.decode(errors="replace")
        if exc.status_code == 400:  # the request, made from the task, is what Docker refused
            raise InvalidInput(f"Docker refused to {what}: {explanation}") from exc
        raise RuntimeUnavailable(f"Docker refused to {what}: {explanation}") from exc
    except (requests.exceptions.RequestException, docker.errors.DockerException, OSError) as exc:
        close_failed_connects(exc)
        raise RuntimeUnavailable(
            f"lost the Docker daemon while trying to {what}: {exc}; {DAEMON_HINT}"
        ) from exc


def let_init_exit(api: docker.APIClient, container: str) -> bool:
    """Tell init, which keeps the container (its cgroup, its tmpfs) for the host until the
    usage is read and the outputs are copied, that it may exit; ``False`` if that did not
    happen within ``NUDGE_TIMEOUT`` (then the caller removes the container by force).

    Under load, gVisor can take half a minute to pass a signal into a sandbox that is still
    tearing down many processes; waiting for that would hold up the removals queued behind.
    The SDK's ``kill`` takes no timeout, hence the same request made here through its
    ``requests`` session, with one.
    """
    url = f"{api.base_url}/v{api.api_version}/containers/{quote(container, safe='')}/kill"
    try:
        with api.post(url, params={"signal": "SIGUSR1"}, timeout=NUDGE_TIMEOUT) as response:
            response.raise_for_status()
    except Exception as exc:  # noqa: BLE001 - a nudge: forced removal follows
        close_failed_connects(exc)
        return False
    return True


def remove_container(api: docker.APIClient, container: str) -> None:
    """Remove ``container`` and its volumes; warn (for a later reap) if that fails."""
    for attempt in range(2):
        try:
            api.remove_container(container, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code == 409 and "in progress" in str(exc):
                return  # close() (or a reap) got there first
            if not attempt and "is not running" in str(exc):
                continue  # it stopped while Docker killed it: now a stopped container
            warn_leftover(container, exc)
        except requests.exceptions.ReadTimeout as exc:
            # The daemon took the request and goes on with it (a gVisor sandbox can take
            # half a minute to die after a fork bomb): wait for it to finish.
            if not _gone_within(api, container, REMOVE_GRACE):
                warn_leftover(container, exc)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            close_failed_connects(exc)
            warn_leftover(container, exc)
        return


def _gone_within(api: docker.APIClient, container: str, seconds: float) -> bool:
    """Whether ``container`` no longer exists, waiting up to ``seconds`` for that."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            api.inspect_container(container)
        except docker.errors.NotFound:
            return True
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            close_failed_connects(exc)
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def warn_leftover(container: str, exc: Exception) -> None:
    warnings.warn(
        f"could not remove container {container[:12]}: {exc}; the next executor's reap (or "
        "parity-sandbox reap) removes it",
        RuntimeWarning,
        stacklevel=3,
    )
