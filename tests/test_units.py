from datetime import timedelta

import pytest

from parity_sandbox._units import format_size, parse_count, parse_cpu, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512m", 512 << 20),
        ("1g", 1 << 30),
        ("1G", 1 << 30),
        ("64k", 64 << 10),
        ("1.5g", 3 << 29),
        ("100", 100),
        (" 2 MiB ", 2 << 20),
        ("1mb", 1 << 20),
        (4096, 4096),
        (4096.0, 4096),
    ],
)
def test_sizes_parse_to_bytes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12x", "", "m", "-1m", "1.5", True, None, [1], "1e9", "0x10"])
def test_bad_sizes_name_the_accepted_form(bad: object) -> None:
    with pytest.raises(ValueError, match="512m"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5m", 300.0),
        ("30s", 30.0),
        ("1.5", 1.5),
        ("250ms", 0.25),
        ("2h", 7200.0),
        (10, 10.0),
        (0.5, 0.5),
        (timedelta(minutes=1), 60.0),
    ],
)
def test_durations_parse_to_seconds(value: object, expected: float) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize("bad", ["5x", "", "-1", "1e3", float("inf"), float("nan"), True, None])
def test_bad_durations_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="30s"):
        parse_duration(bad)


def test_cpu_and_count() -> None:
    assert parse_cpu("1.0") == 1.0
    assert parse_cpu(2) == 2.0
    assert parse_count("64") == 64
    for bad in ("one", True, float("inf")):
        with pytest.raises(ValueError):
            parse_cpu(bad)
    for bad in ("1.5", -3.0, True, "x"):
        with pytest.raises(ValueError):
            parse_count(bad)


def test_format_size_round_trips() -> None:
    for size in (512 << 20, 1 << 30, 3 << 10, 1000):
        assert parse_size(format_size(size)) == size
