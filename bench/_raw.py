"""The baseline: a minimal raw wasmtime-py loop (fresh store per run, output captured to a cap).

Run as ``python bench/_raw.py MODULE N`` it prints one run time in microseconds per line; the
throughput benchmark runs it in several processes at once.
"""

from __future__ import annotations

import os
import sys
import time

import wasmtime

CAP = 1 << 20


class RawRunner:
    """What a careful user would write by hand: one engine, a linked module, a store per run."""

    def __init__(self, path: str) -> None:
        self.engine = wasmtime.Engine()
        module = wasmtime.Module.from_file(self.engine, path)
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        self.pre = linker.instantiate_pre(module)

    def run(self) -> bytes:
        out = bytearray()

        def capture(data: bytes) -> None:
            if len(out) < CAP:
                out.extend(data[: CAP - len(out)])

        wasi = wasmtime.WasiConfig()
        wasi.argv = ["task.wasm"]
        wasi.stdout_custom = capture
        wasi.stderr_custom = capture
        store = wasmtime.Store(self.engine)
        store.set_wasi(wasi)
        instance = self.pre.instantiate(store)
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        try:
            start(store)
        except wasmtime.ExitTrap as exc:
            assert exc.code == 0
        return bytes(out)


def main() -> None:
    path, count = sys.argv[1], int(sys.argv[2])
    runner = RunRunner = RawRunner(path)
    del RunRunner
    for _ in range(count):
        started = time.perf_counter()
        runner.run()
        print(f"{(time.perf_counter() - started) * 1e6:.1f}", flush=False)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
