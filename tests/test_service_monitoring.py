"""The service's monitoring, as an operator meets it: a real ``parity-sandbox serve`` process
with an audit log, keys made with the CLI; ``/metrics`` and its keys, the counts it exports
after real tasks, the audit entries the service writes (keys, cancels, task ends with the
key's id, the configuration), ``/v1/stats``, and the dashboard in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import WasmFixtures
from service_server import Service, module_task, running_service

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    audit = {"PARITY_SANDBOX_AUDIT_PATH": "{state}/audit.log"}
    with running_service(tmp_path_factory, audit) as server:
        yield server


def is_problem(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"


def scrape(service: Service) -> dict[str, float]:
    with service.client(service.keys["root"]) as admin:
        response = admin.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def key_ids(service: Service) -> dict[str, str]:
    return {name: key_id for key_id, name in service.database_rows("SELECT id, name FROM keys")}


def audit_entries(service: Service) -> list[dict[str, Any]]:
    path = service.state / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_entry(service: Service, **match: Any) -> dict[str, Any]:
    """The audit entry with ``match``'s fields (the service writes entries on a thread)."""
    deadline = time.monotonic() + 10
    while True:
        for entry in audit_entries(service):
            if all(entry.get(name) == value for name, value in match.items()):
                return entry
        assert time.monotonic() < deadline, (match, audit_entries(service)[-5:])
        time.sleep(0.05)


def test_metrics_need_an_admin_key(service: Service) -> None:
    for key in (None, "psk_wrong"):
        with service.client(key) as stranger:
            is_problem(stranger.get("/metrics"), 401)
    with service.client(service.keys["alice"]) as alice:
        is_problem(alice.get("/metrics"), 403)
        is_problem(alice.get("/v1/stats"), 403)
    samples = scrape(service)
    assert samples["parity_sandbox_service_queue_limit"] == 10_000
    assert samples['parity_sandbox_runtime_up{runtime="wasm"}'] == 1


def test_metrics_count_the_service_tasks(service: Service, wasm: WasmFixtures) -> None:
    wasm_status = 'parity_sandbox_tasks_total{oci_runtime="none",runtime="wasm",status="%s"}'
    trap_of_bob = 'parity_sandbox_key_security_events_total{key="bob",kind="guest_trap"}'
    before = scrape(service)
    with service.client(service.keys["alice"]) as alice:
        for task in [module_task(wasm.hello)] * 3 + [module_task(wasm.exit_code)]:
            assert alice.post("/v1/tasks?wait=20", json=task).status_code == 200
    with service.client(service.keys["bob"]) as bob:
        view = bob.post("/v1/tasks?wait=20", json=module_task(wasm.trap)).json()
        assert view["state"] == "error"
    after = scrape(service)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew(wasm_status % "succeeded") == 3
    assert grew(wasm_status % "failed") == 1
    assert grew(wasm_status % "error") == 1
    assert grew(trap_of_bob) == 1
    assert grew('parity_sandbox_security_events_total{kind="guest_trap",runtime="wasm"}') == 1
    waits = 'parity_sandbox_queue_wait_seconds_count{runtime="wasm"}'
    assert grew(waits) == 5
    assert after['parity_sandbox_service_tasks{state="queued"}'] == 0


def test_metrics_can_be_open_to_anyone(tmp_path: Path) -> None:
    server = Service(tmp_path / "state", tmp_path / "cache")
    server.extra_env["PARITY_SANDBOX_SERVICE_METRICS_OPEN"] = "true"
    (tmp_path / "state").mkdir()
    server.start()
    try:
        with server.client(None) as anyone:
            response = anyone.get("/metrics")
            assert response.status_code == 200, response.text
            assert "parity_sandbox_service_queue_limit 10000.0" in response.text
            is_problem(anyone.get("/v1/stats"), 401)  # the dashboard's data stays admin's
    finally:
        server.stop()


def test_the_service_writes_its_actions_to_the_audit_log(
    service: Service, wasm: WasmFixtures
) -> None:
    ids = key_ids(service)
    loaded = wait_for_entry(service, action="config_loaded")
    assert re.fullmatch(r"[0-9a-f]{64}", loaded["config_sha256"])
    made = wait_for_entry(service, action="key_created", name="root")
    assert made["key_id"] == ids["root"] and made["admin"] is True
    # a key made and revoked while the server runs
    service.make_key("carol")
    assert service.cli("keys", "revoke", "carol").returncode == 0
    carol = key_ids(service)["carol"]
    wait_for_entry(service, action="key_created", key_id=carol, name="carol")
    wait_for_entry(service, action="key_revoked", key_id=carol, name="carol")
    with service.client(service.keys["alice"]) as alice:
        task = module_task(wasm.hello, id="audit-probe")
        assert alice.post("/v1/tasks?wait=20", json=task).json()["state"] == "succeeded"
        sleeper = alice.post("/v1/tasks", json=module_task(wasm.sleep, args=["30"])).json()
        assert alice.post(f"/v1/tasks/{sleeper['id']}/cancel").status_code == 200
    end = wait_for_entry(service, action="task_end", task_id="audit-probe")
    assert end["who"] == ids["alice"] and end["status"] == "succeeded", end
    assert re.fullmatch(r"[0-9a-f]{64}", end["program"]["module_sha256"])
    assert re.fullmatch(r"[0-9a-f]{64}", end["result_hash"])
    cancelled = wait_for_entry(service, action="task_cancelled", task_id=sleeper["id"])
    assert cancelled["who"] == ids["alice"]
    # one chain across the CLI's and the server's writes
    done = service.cli("audit", "verify", str(service.state / "audit.log"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_stats_match_the_store(service: Service, wasm: WasmFixtures) -> None:
    with service.client(service.keys["bob"]) as bob:
        bob.post(
            "/v1/tasks?wait=20",
            json=module_task(wasm.flood, args=["5000"], limits={"output": 100}),
        )
    with service.client(service.keys["root"]) as admin:
        stats = admin.get("/v1/stats").json()
    ended = dict(
        service.database_rows(
            f"SELECT state, count(*) FROM tasks WHERE ended_at >= {stats['time'] - 3600} "
            "GROUP BY state"
        )
    )
    assert stats["ended_last_hour"] == ended
    assert stats["queued"] == 0 and stats["queue_limit"] == 10_000
    counts = stats["events_per_minute"]["counts"]
    assert sum(counts["output_truncated"]) >= 1 and sum(counts["guest_trap"]) >= 1
    assert len(stats["events_per_minute"]["minutes"]) == 60
    assert [entry["key"] for entry in stats["top_keys_by_cpu"]][:2] != []
    assert {runtime["name"]: runtime["ok"] for runtime in stats["runtimes"]}["wasm"] is True


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("PARITY_TEST_CHROMIUM") == "required":
            pytest.fail("Chromium is required here (apt-get install chromium)")
        pytest.skip("no Chromium (apt-get install chromium)")
    return found


def headless(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--disable-gpu",
            "--no-sandbox",  # the test may run as root, where Chromium's sandbox refuses
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=8000",
            "--window-size=1280,1400",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_dashboard_shows_the_apis_numbers_in_chromium(
    service: Service, wasm: WasmFixtures, tmp_path: Path
) -> None:
    with service.client(service.keys["bob"]) as bob:  # something to show: a limit hit
        bob.post("/v1/tasks?wait=20", json=module_task(wasm.membomb, limits={"memory": "32m"}))
    with service.client(None) as anyone:
        page = anyone.get("/dashboard")
    assert (
        page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    )
    assert "psk_" not in page.text  # a shell: no data, no key
    # The key travels in the fragment, which the browser never sends to the server.
    url = f"{service.url}/dashboard#key={service.keys['root']}"
    dom = headless(url, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    html = dom.stdout
    assert 'data-loaded="1"' in html and 'data-errors="0"' in html, html[:2000]
    with service.client(service.keys["root"]) as admin:
        stats = admin.get("/v1/stats").json()

    def shown(element_id: str) -> str:
        # a number (id and value on one element), or a table row (the value in its cell)
        found = re.search(rf'id="{element_id}"[^>]*data-value="([^"]*)"', html) or re.search(
            rf'id="{element_id}"><td>[^<]*</td><td[^>]*data-value="([^"]*)"', html
        )
        assert found is not None, (element_id, html[:3000])
        return found.group(1)

    assert shown("queued") == str(stats["queued"])
    assert shown("running") == str(stats["running"])
    assert shown("queue-limit") == str(stats["queue_limit"])
    for state, count in stats["ended_last_hour"].items():
        assert shown(f"ended-{state}") == str(count), state
    limit_hits = sum(stats["events_per_minute"]["counts"]["limit_hit"])
    assert limit_hits >= 1
    assert shown("events-limit_hit") == str(limit_hits)
    assert "<canvas" in html
    # the screenshot, an artifact of the run
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    taken = headless(url, tmp_path / "profile2", f"--screenshot={shot}")
    assert taken.returncode == 0, taken.stderr
    assert shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")
    # the server never saw the key in a URL
    assert service.keys["root"] not in service.log()
