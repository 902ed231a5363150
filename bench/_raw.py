"""Baselines: minimal raw wasmtime-py loops (fresh store per run, output captured to a cap).

Two capture styles, both keeping at most ``CAP`` bytes of each stream:

- ``callback``: wasmtime-py's in-memory capture (``WasiConfig.stdout_custom``), what a user of
  wasmtime-py writes to capture output;
- ``pipe``: the capture parity-sandbox uses (output inherited as pipes, read afterwards).

Each baseline runs in a process of its own (the pipe style takes over fds 1 and 2); see
``main`` for the command line.
"""

from __future__ import annotations

import os
import sys
import time

import wasmtime

CAP = 1 << 20


class RawRunner:
    """One engine, one linked module, a fresh store and WASI context per run."""

    def __init__(self, path: str, style: str = "callback") -> None:
        self.engine = wasmtime.Engine()
        module = wasmtime.Module.from_file(self.engine, path)
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        self.pre = linker.instantiate_pre(module)
        self.style = style
        if style == "pipe":
            self._read_ends = []
            self._saved = [os.dup(1), os.dup(2)]
            for target in (1, 2):
                read_end, write_end = os.pipe()
                os.set_blocking(read_end, False)
                os.dup2(write_end, target)
                os.close(write_end)
                self._read_ends.append(read_end)

    def run(self) -> bytes:
        out = bytearray()

        def capture(data: bytes) -> None:
            if len(out) < CAP:
                out.extend(data[: CAP - len(out)])

        wasi = wasmtime.WasiConfig()
        wasi.argv = ["task.wasm"]
        if self.style == "pipe":
            wasi.inherit_stdout()
            wasi.inherit_stderr()
        else:
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
        if self.style == "pipe":
            for fd in self._read_ends:
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                capture(data)
        return bytes(out)


def main() -> None:
    """``_raw.py MODULE STYLE latency N`` prints N run times (us), one per line, after a warm-up;
    ``_raw.py MODULE STYLE throughput SECONDS`` prints the number of runs done in that time."""
    path, style, mode, amount = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    runner = RawRunner(path, style)
    out = runner._saved[0] if style == "pipe" else 1
    for _ in range(20):
        runner.run()
    lines = []
    if mode == "latency":
        for _ in range(int(amount)):
            started = time.perf_counter()
            runner.run()
            lines.append(f"{(time.perf_counter() - started) * 1e6:.1f}")
    else:
        runs = 0
        end = time.perf_counter() + amount
        while time.perf_counter() < end:
            runner.run()
            runs += 1
        lines.append(str(runs))
    os.write(out, ("\n".join(lines) + "\n").encode())
    # wasmtime's runtime threads can abort during interpreter teardown; skip it.
    os._exit(0)


if __name__ == "__main__":
    main()
