"""The alerting rules shipped in ``deploy/prometheus/``: valid (``promtool check rules``),
firing as their unit tests say (``promtool test rules``), and naming only metrics the code
really exports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from parity_sandbox import Result, Status

pytest.importorskip("prometheus_client")

from parity_sandbox.metrics import Metrics

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def promtool() -> str:
    """promtool (Debian: apt-get install prometheus; scripts/services-setup.sh installs it)."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("PARITY_TEST_PROMTOOL") == "required":
            pytest.fail("promtool is required here (apt-get install prometheus)")
        pytest.skip("no promtool (apt-get install prometheus)")
    return found


def test_the_rules_are_valid() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES / "alerts.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_the_rules_fire_as_their_unit_tests_say() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"],
        capture_output=True,
        text=True,
        cwd=RULES,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_a_rule_test_that_expects_otherwise_fails(tmp_path: Path) -> None:
    """promtool really checks the expected values (so the test above can fail)."""
    shutil.copy(RULES / "alerts.yml", tmp_path)
    right = (RULES / "alerts_test.yml").read_text()
    wrong = right.replace("mallory: 6 escape", "mallory: 7 escape")
    (tmp_path / "alerts_test.yml").write_text(wrong)
    done = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr


def exported_names() -> set[str]:
    """Every sample name a ``Metrics`` exports once each of its hooks has counted."""
    metrics = Metrics()
    result = Result(
        status=Status.RESOURCE_LIMIT,
        limit="memory",
        events=[{"kind": "oom_kill", "time": "2026-01-01T00:00:00Z", "details": {}}],
        usage={"cpu_time": 0.5},
    )
    metrics.ended(result, "docker", waited=0.1)
    metrics.rejected("wasm")
    metrics.cache_lookup("wasm", True)
    metrics.cache_lookup("wasm", False)
    metrics.damaged("entry")
    metrics.warm_pool_lookup("docker", True)
    metrics.warm_pool_lookup("docker", False)
    metrics.watch_warm_pool("docker", lambda: 1)
    metrics.worker_restarted("wasm")
    metrics.leftovers("docker", 1)
    metrics.runtime_error("docker")
    metrics.set_runtime_up("docker", True)
    metrics.key_ended("alice", result)
    metrics.service_state(queued=1, running=1, limit=10, per_key={("alice", "queued"): 1})
    text = metrics.exposition()[0].decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def test_the_rules_name_only_exported_metrics() -> None:
    exported = exported_names()
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())
    named: set[str] = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            named |= set(re.findall(r"\bparity_sandbox_[a-z_]+", rule["expr"]))
    assert len(named) >= 8, named
    assert named <= exported, named - exported
