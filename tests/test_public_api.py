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
