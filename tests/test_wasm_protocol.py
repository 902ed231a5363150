"""The pure translation of limits to wasmtime settings (no wasmtime needed)."""

import pytest

from parity_sandbox import Config, InvalidInput, Limits
from parity_sandbox.runtimes.wasm.executor import wasm_limits
from parity_sandbox.runtimes.wasm.protocol import WasmLimits, store_settings


def test_limits_map_onto_store_and_engine_settings() -> None:
    limits = wasm_limits(
        Config(memory_limit="64m", fuel=5000, stack_size="512k", disk_limit="8m").limits_for("wasm")
    )
    settings = store_settings(limits)
    assert settings.memory_size == 64 << 20
    assert settings.fuel == 5000 and settings.consume_fuel
    assert settings.max_wasm_stack == 512 << 10
    assert settings.file_size_limit == 8 << 20
    assert settings.memories == 1


def test_without_fuel_the_engine_does_not_meter() -> None:
    limits = WasmLimits(memory=1 << 20, timeout=1.0, stack_size=1 << 20, disk=1 << 20, output=0)
    assert store_settings(limits).consume_fuel is False
    assert limits.engine_key == (1 << 20, False, False)


def test_more_memory_than_wasm32_addresses_is_refused() -> None:
    resolved = Config().limits_for("wasm").merged(Limits(memory="5g"))
    with pytest.raises(InvalidInput, match="4 GiB"):
        wasm_limits(resolved)
