"""Runs in the bench venv: times epicbox's ``run`` of a trivial task; one line per run (s).

    bench/.venv/bin/python bench/_epicbox_peer.py IMAGE RUNS

epicbox 1.1.0 passes ``method_whitelist`` to urllib3's ``Retry``, which urllib3 2 renamed
``allowed_methods``; the shim below maps the old name so that the released package runs.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import urllib3.util.retry

_original = urllib3.util.retry.Retry.__init__


def _accept_old_name(self: Any, *args: Any, method_whitelist: Any = None, **kwargs: Any) -> None:
    if method_whitelist is not None:
        kwargs.setdefault("allowed_methods", method_whitelist)
    _original(self, *args, **kwargs)


urllib3.util.retry.Retry.__init__ = _accept_old_name  # type: ignore[method-assign]

import epicbox  # noqa: E402 - after the shim

image, runs = sys.argv[1], int(sys.argv[2])
epicbox.configure(profiles=[epicbox.Profile("bench", image)])
for _ in range(runs):
    started = time.perf_counter()
    result = epicbox.run("bench", "echo hi", limits={"cputime": 5, "memory": 64})
    elapsed = time.perf_counter() - started
    assert result["stdout"] == b"hi\n", result
    print(f"{elapsed:.6f}", flush=True)
