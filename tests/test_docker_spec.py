"""The translation of a task into a container (pure: no Docker needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from parity_sandbox import Config, DockerSettings, InvalidInput, Limits, Task
from parity_sandbox._config import DEFAULT_LIMITS
from parity_sandbox.runtimes.docker import host
from parity_sandbox.runtimes.docker.seccomp import profile, security_opt
from parity_sandbox.runtimes.docker.spec import (
    PAUSE_ROLE,
    ROLE,
    ImageInfo,
    Plan,
    command_block,
    joining,
    pause_container,
    plan,
)

IMAGE = ImageInfo(reference="img", id="sha256:" + "a" * 64, entrypoint=(), cmd=("sh",))


def make(task: Task, settings: DockerSettings | None = None, limits: Limits | None = None) -> Plan:
    return plan(
        task,
        limits or DEFAULT_LIMITS,
        settings or DockerSettings(),
        IMAGE,
        init_image="derived",
        labels={"parity_sandbox.managed": "true"},
        seccomp=security_opt("x86_64"),
    )


def test_hardened_defaults() -> None:
    built = make(Task(image="img", command=["true"]))
    host: dict[str, Any] = built.host_config
    assert host["network_mode"] == "none"
    assert host["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in host["security_opt"]
    assert any(opt.startswith("seccomp=") for opt in host["security_opt"])
    assert host["read_only"] is True
    assert host["privileged"] is False
    assert host["ipc_mode"] == "private"
    assert host["log_config"]["Type"] == "none"
    assert host["mem_limit"] == host["memswap_limit"] == 256 << 20
    assert host["nano_cpus"] == 1_000_000_000
    assert host["pids_limit"] == 256 + 1  # the task's processes and our init
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in host["ulimits"]}
    assert ulimits["core"] == (0, 0)
    assert ulimits["fsize"] == (64 << 20, 64 << 20)
    assert "nofile" in ulimits and "nproc" in ulimits
    assert host["tmpfs"]["/tmp"].startswith(f"size={64 << 20},")
    assert "nosuid" in host["tmpfs"]["/tmp"] and "nodev" in host["tmpfs"]["/tmp"]
    assert host["shm_size"] == 64 << 20
    # never a bind mount, a device or the Docker socket
    assert "binds" not in host and "devices" not in host and "volumes_from" not in host
    (work,) = host["mounts"]
    assert work["Target"] == "/work" and work["Type"] == "volume" and not work.get("Source")
    options = work["VolumeOptions"]["DriverConfig"]["Options"]
    assert options["type"] == "tmpfs"
    assert options["o"].startswith(f"size={64 << 20},uid=65534,gid=65534,")
    assert built.create["user"] == "65534:65534"
    assert built.create["working_dir"] == "/work"
    # The container runs our init alone; the task's command reaches it over stdin.
    assert built.create["entrypoint"] == ["/.parity/init"]
    assert "command" not in built.create and "environment" not in built.create
    assert built.command == command_block(["true"], {}, None, ("out",))


def test_the_pause_container_is_hardened_like_a_task_s() -> None:
    """It holds a runsc task's network namespace: runc, no capability, read-only, our
    seccomp profile, tiny limits, loopback only, and the run's labels (for reap)."""
    built = make(Task(image="img", command=["true"], oci_runtime="runsc"))
    labels = {"parity_sandbox.managed": "true", "parity_sandbox.run": "r1"}
    create, host_config = pause_container(
        built.shape, labels=labels, seccomp=security_opt("x86_64")
    )
    assert host_config["runtime"] == "runc" and host_config["network_mode"] == "none"
    assert create["network_disabled"] is True
    assert host_config["cap_drop"] == ["ALL"] and host_config["read_only"] is True
    assert "no-new-privileges:true" in host_config["security_opt"]
    assert any(opt.startswith("seccomp=") for opt in host_config["security_opt"])
    assert host_config["mem_limit"] <= 64 << 20 and host_config["pids_limit"] <= 64
    assert "privileged" not in host_config and "mounts" not in host_config
    assert create["user"] == "65534:65534" and create["entrypoint"] == ["/.parity/init"]
    assert create["labels"] == {**labels, ROLE: PAUSE_ROLE}


def test_a_task_s_container_joins_the_pause_container_s_network() -> None:
    built = make(Task(image="img", command=["true"], oci_runtime="runsc"))
    create, host_config = joining(built.create, built.host_config, "abc", "runsc-egress")
    assert host_config["network_mode"] == "container:abc"
    assert host_config["runtime"] == "runsc-egress"
    # Docker refuses these with a joined network, and would ignore the join if disabled.
    assert "hostname" not in create and create["network_disabled"] is False
    assert "dns" not in host_config and "extra_hosts" not in host_config
    # the rest is the task's hardened container, unchanged (and the plan itself untouched)
    assert built.host_config["network_mode"] == "none" and built.host_config["runtime"] == "runsc"
    for key in ("cap_drop", "security_opt", "read_only", "mem_limit", "ulimits", "mounts"):
        assert host_config[key] == built.host_config[key]


def test_open_files_and_file_size_become_ulimits() -> None:
    limits = DEFAULT_LIMITS.merged(Limits(open_files=64, file_size="1m", output_files=2))
    built = make(Task(image="img", command=["true"]), limits=limits)
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in built.host_config["ulimits"]}
    assert ulimits["nofile"] == (64, 64)
    assert ulimits["fsize"] == (1 << 20, 1 << 20)
    assert built.output_files == 2
    default = make(Task(image="img", command=["true"]))
    assert {u["Name"]: u["Soft"] for u in default.host_config["ulimits"]}["nofile"] == 4096


def test_localhost_resolves_and_tmp_is_exec(tmp_path: Path) -> None:
    hosts = host.hosts_file(tmp_path / "docker", "sandbox")
    assert hosts.read_text().splitlines()[0] == "127.0.0.1\tlocalhost sandbox"
    assert host.hosts_file(tmp_path / "docker", "sandbox") == hosts  # written once
    task = Task(image="img", command=["true"])
    local = plan(
        task,
        DEFAULT_LIMITS,
        DockerSettings(),
        IMAGE,
        init_image="derived",
        labels={},
        seccomp="seccomp=x",
        hosts=str(hosts),
    )
    assert local.create["hostname"] == "sandbox" and local.create["network_disabled"] is True
    binds = [m for m in local.host_config["mounts"] if m["Type"] == "bind"]
    assert binds == [
        {"Target": "/etc/hosts", "Source": str(hosts), "Type": "bind", "ReadOnly": True}
    ]  # the only host path a container sees: the executor's own, read-only
    # a daemon that cannot see our files writes /etc/hosts itself (a network sandbox)
    remote = make(task)
    assert remote.create["network_disabled"] is False
    assert remote.host_config["extra_hosts"] == {"sandbox": "127.0.0.1"}
    assert remote.host_config["dns"] == ["127.0.0.1"]  # not the host's resolver
    assert "noexec" not in remote.host_config["tmpfs"]["/tmp"]


def test_the_hosts_file_needs_a_private_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(OSError, match="only this user"):
        host.hosts_file(shared, "sandbox")


def test_input_beyond_the_input_limit_is_refused() -> None:
    limits = DEFAULT_LIMITS.merged(Limits(memory="64m"))
    with pytest.raises(InvalidInput) as raised:
        make(
            Task(image="img", command=["true"], input_files={"a": b"x" * (33 << 20)}), limits=limits
        )
    assert raised.value.field == "input_files"
    fits = make(Task(image="img", command=["true"], input=b"x" * (32 << 20)), limits=limits)
    assert fits.input_bytes == 32 << 20


def test_the_command_block_is_length_prefixed_tagged_entries() -> None:
    block = command_block(["sh", "-c", "echo ü"], {"A": "1=2"}, "/tmp", ("out", "x/y"))
    body = b"ash\0a-c\0aecho \xc3\xbc\0eA=1=2\0oout\0ox/y\0w/tmp\0"
    assert block == len(body).to_bytes(4, "big") + body
    with pytest.raises(InvalidInput, match="NUL"):
        command_block(["a\0b"], {}, None, ())


def test_tasks_that_differ_only_in_what_init_is_told_share_a_shape() -> None:
    one = make(Task(image="img", command=["true"], env={"A": "1"}, input=b"x"))
    two = make(Task(image="img", command=["false"], workdir="/tmp", outputs=["o"]))
    assert one.shape == two.shape and one.command != two.command
    assert (
        make(
            Task(image="img", command=["true"], limits={"memory": "64m"}),
            limits=DEFAULT_LIMITS.merged(Limits(memory="64m")),
        ).shape
        != one.shape
    )


def test_runsc_bounds_processes_with_nproc_not_the_pids_cgroup() -> None:
    built = make(
        Task(image="img", command=["true"], oci_runtime="runsc", limits={"pids": 40}),
        limits=DEFAULT_LIMITS.merged(Limits(pids=40)),
    )
    assert "pids_limit" not in built.host_config
    nproc = next(u for u in built.host_config["ulimits"] if u["Name"] == "nproc")
    assert nproc["Soft"] == nproc["Hard"] == 40 + 1
    assert built.runtime == "runsc"


def test_command_defaults_to_the_images_entrypoint_and_cmd() -> None:
    image = ImageInfo(reference="img", id="x", entrypoint=("/entry",), cmd=("a", "b"))
    built = plan(
        Task(image="img"),
        DEFAULT_LIMITS,
        DockerSettings(),
        image,
        init_image="d",
        labels={},
        seccomp="seccomp={}",
    )
    assert built.command == command_block(["/entry", "a", "b"], {}, None, ("out",))
    empty = ImageInfo(reference="img", id="x")
    with pytest.raises(InvalidInput, match="no default command"):
        plan(
            Task(image="img"),
            DEFAULT_LIMITS,
            DockerSettings(),
            empty,
            init_image="d",
            labels={},
            seccomp="seccomp={}",
        )


def test_root_and_privileged_need_the_operator() -> None:
    with pytest.raises(InvalidInput, match="root"):
        make(Task(image="img", command=["id"], user="0"))
    with pytest.raises(InvalidInput, match="root"):
        make(Task(image="img", command=["id"], user="1000:0"))
    assert make(Task(image="img", command=["id"], user="0"), DockerSettings(allow_root=True))
    with pytest.raises(InvalidInput, match="allow_privileged"):
        make(Task(image="img", command=["id"], privileged=True))
    with pytest.raises(InvalidInput, match="allow_privileged"):
        Config(docker={"privileged": True})
    assert make(Task(image="img", command=["id"], user="1000")).create["user"] == "1000:1000"


def test_input_files_get_a_sized_read_only_volume() -> None:
    built = make(Task(image="img", command=["true"], input_files={"a/b.txt": b"x" * 5000}))
    target = {m["Target"]: m for m in built.host_config["mounts"]}
    assert "/input" in target
    assert built.inputs is not None and b"a/b.txt" in built.inputs


def test_gpus_become_device_requests() -> None:
    built = make(Task(image="img", command=["true"], gpus="all"))
    (request,) = built.host_config["device_requests"]
    assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]


@pytest.mark.parametrize(
    "image",
    [
        "-v/:/host",
        "--privileged",
        "Busybox",
        "a b",
        "busybox;id",
        "busybox\x00",
        "",
        "a" * 600,
        "busybox:" + "x" * 200,
        "../busybox",
        "busybox@sha256:xyz",
    ],
)
def test_hostile_image_names_are_refused(image: str) -> None:
    with pytest.raises(InvalidInput, match="image"):
        Task(image=image)


@pytest.mark.parametrize(
    "image",
    [
        "busybox",
        "library/busybox:1.36",
        "registry.local:5000/team/app:v1.2-rc",
        "sha256:" + "0" * 64,
        "busybox@sha256:" + "f" * 64,
    ],
)
def test_ordinary_image_names_are_accepted(image: str) -> None:
    assert Task(image=image).image == image


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user", "root"),
        ("user", "-1"),
        ("user", "1:2:3"),
        ("workdir", "relative"),
        ("workdir", "/work/../etc"),
        ("command", ["a\x00b"]),
        ("gpus", 0),
    ],
)
def test_bad_docker_fields_are_refused(field: str, value: object) -> None:
    with pytest.raises(InvalidInput, match=field):
        Task(image="busybox", **{field: value})


def test_docker_fields_need_a_docker_task() -> None:
    with pytest.raises(InvalidInput, match="image"):
        Task(wasm_module=b"\0asm", command=["x"])
    with pytest.raises(InvalidInput):
        Task(image="busybox", runtime="wasm")
    with pytest.raises(InvalidInput, match="command"):
        Task(image="busybox", args=("x",))


def test_seccomp_profile_denies_what_docker_allows() -> None:
    document = profile("x86_64")
    assert document["defaultAction"] == "SCMP_ACT_ERRNO"
    assert document["architectures"] == ["SCMP_ARCH_X86_64"]
    allowed = {
        name
        for rule in document["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args")
        for name in rule["names"]
    }
    for denied in (
        "ptrace",
        "io_uring_setup",
        "keyctl",
        "add_key",
        "bpf",
        "mount",
        "unshare",
        "setns",
        "userfaultfd",
        "perf_event_open",
        "open_by_handle_at",
        "kexec_load",
    ):
        assert denied not in allowed
    for needed in ("read", "write", "execve", "mmap", "futex", "wait4", "openat"):
        assert needed in allowed
    families = {
        rule["args"][0]["value"] for rule in document["syscalls"] if rule["names"] == ["socket"]
    }
    assert 40 not in families  # AF_VSOCK
    assert {1, 2, 10} <= families
    assert json.loads(security_opt("x86_64").removeprefix("seccomp=")) == document


def unconditional(document: dict[str, Any]) -> set[str]:
    return {
        name
        for rule in document["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args")
        for name in rule["names"]
    }


def test_runsc_gets_a_variant_that_gvisor_reads_as_meant() -> None:
    linux, gvisor = profile("x86_64"), profile("x86_64", "runsc")
    # runc: clone3 answers ENOSYS (glibc falls back to clone, whose flags are filtered)
    assert "clone3" not in unconditional(linux)
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} in linux["syscalls"]
    # runsc ignores errnoRet and names pselect6 "pselect": clone3 is allowed (gVisor's kernel
    # answers ENOSYS), and both names of pselect are listed
    assert {"clone3", "pselect", "pselect6"} <= unconditional(gvisor)
    assert not any(
        rule["names"] == ["clone3"] for rule in gvisor["syscalls"] if rule.get("errnoRet")
    )
    assert unconditional(gvisor) - unconditional(linux) == {"clone3", "pselect"}
    assert json.loads(security_opt("x86_64", "runsc").removeprefix("seccomp=")) == gvisor


def test_block_io_support_is_read_from_the_cgroup_tree(tmp_path: Path) -> None:
    from parity_sandbox.runtimes.docker.host import blkio_available

    assert not blkio_available(tmp_path)
    (tmp_path / "blkio").mkdir()
    (tmp_path / "blkio" / "blkio.throttle.read_bps_device").write_text("")
    assert blkio_available(tmp_path)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert blkio_available(v2)
