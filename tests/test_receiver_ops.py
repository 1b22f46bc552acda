"""The receiver for branch IT: Prometheus metrics (device ids as the only label), the shipped
alert rules checked and unit-tested with Debian's promtool, the webhook sender against a
loopback HTTP server, and retention with legal holds and the signed deletion log that explains
the deleted range to verify."""
# ruff: noqa: F811 (the fixtures come from test_receiver)

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dualrec_tools.deletion_log import DeletionLogError, explain, read_log
from dualrec_tools.receiver import retention as retention_mod
from dualrec_tools.receiver.alerts import AlertConfig
from dualrec_tools.receiver.retention import Retention, RetentionPolicy
from dualrec_tools.receiver.server import ReceiverConfig, ReceiverThread
from dualrec_tools.verify import verify_dir
from test_receiver import (  # noqa: F401
    DEV,
    DEV2,
    Seg,
    World,
    _enroll,
    _seal,
    admin_auth,
    client,
    put_header,
    put_payload,
    receiver,
    world,
)

RULES = Path(__file__).resolve().parents[1] / "host_tools/dualrec_tools/receiver"
pytestmark = pytest.mark.timeout(60)


def _metrics(url: str) -> dict[str, list]:
    text = httpx.get(url, timeout=5).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(m: dict[str, list], name: str, device: str) -> float:
    return next(s.value for s in m[name] if s.labels.get("device") == device)


def test_metrics_per_device(receiver, world: World) -> None:
    rx = receiver(metrics_host="127.0.0.1", metrics_port=0)
    with client(rx, world) as c:
        for seg in world.a[:3]:
            assert put_header(c, seg).status_code == 202
        assert put_payload(c, world.a[0]).status_code == 200
        put_header(c, world.b[0])  # a fork: counted
    m = _metrics(f"{rx.admin_url}/metrics")
    assert _value(m, "dualrec_device_headers", DEV) == 3
    assert _value(m, "dualrec_device_payloads", DEV) == 1
    assert _value(m, "dualrec_device_backlog", DEV) == 2
    assert _value(m, "dualrec_device_payload_bytes", DEV) == len(world.a[0].payload)
    assert _value(m, "dualrec_device_forks", DEV) == 1
    assert _value(m, "dualrec_device_missing_segments", DEV) == 0
    assert _value(m, "dualrec_device_last_contact_timestamp_seconds", DEV) > time.time() - 60
    assert _value(m, "dualrec_device_clock_synced", DEV) in (0, 1)
    assert _value(m, "dualrec_device_cert_expiry_timestamp_seconds", DEV) > time.time()
    assert any(s.labels == {"device": DEV, "kind": "fork"} for s in m["dualrec_device_problems"])
    assert "dualrec_receiver_connections" in m and "dualrec_receiver_tls_refused" in m
    assert any(s.labels == {"reason": "fork"} and s.value == 1
               for s in m["dualrec_receiver_refusals"])
    for samples in m.values():  # device ids, reasons and kinds only: no customer data
        for s in samples:
            assert set(s.labels) <= {"device", "kind", "reason", "version"}, s
    # The separate listener serves the same; the upload port does not serve metrics at all.
    assert "dualrec_device_headers" in _metrics(rx.running.metrics_url)
    with client(rx, world) as c:
        assert c.get("/metrics").status_code == 404


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool missing: scripts/setup-system.sh installs prometheus")
def test_alert_rules_pass_promtool() -> None:
    check = subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=RULES,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=RULES,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr


class _Hook(BaseHTTPRequestHandler):
    bodies: ClassVar[list[dict]] = []
    fail_next = 1  # the first POST gets a 500: the sender must retry

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).fail_next:
            type(self).fail_next -= 1
            self.send_response(500)
        else:
            type(self).bodies.append(json.loads(body))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_webhook_on_alert_transitions(tmp_path: Path, world: World) -> None:
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    cfg = AlertConfig(f"http://127.0.0.1:{hook.server_address[1]}/hook", interval_s=0.2,
                      silent_s=1.0, opening_hours=(0, 24, frozenset(range(7))), backoff_s=0.05)
    rx = ReceiverThread(ReceiverConfig(tmp_path / "data", world.keys, port=0, admin_port=0,
                                       alerts=cfg)).start()
    try:
        _enroll(rx.store, world, DEV)

        def silent(status: str) -> bool:
            return any(b["alert"] == "DualrecBoxSilent" and b["status"] == status
                       for b in _Hook.bodies)

        with client(rx, world) as c:
            assert put_header(c, world.a[0]).status_code == 202
        deadline = time.monotonic() + 10
        while not silent("firing") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert silent("firing")
        with client(rx, world) as c:
            assert c.get(f"/v1/devices/{DEV}/status").status_code == 200
        deadline = time.monotonic() + 10
        while not silent("resolved") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert silent("resolved")
        body = next(b for b in _Hook.bodies if b["alert"] == "DualrecBoxSilent")
        assert body["device"] == DEV and set(body) == {"alert", "device", "status", "summary",
                                                        "utc_ns", "receiver"}
    finally:
        rx.stop()
        hook.shutdown()


@pytest.fixture(scope="module")
def sessions(world: World, tmp_path_factory: pytest.TempPathFactory) -> list[list[Seg]]:
    """One chain of DEV (the enrolled key) with three sessions: 2, 2 and 1 segments."""
    base = tmp_path_factory.mktemp("sessions")
    return [_seal(base, DEV, world.signing[DEV], n, f"20250301T09000{i}Z-00000{i}")
            for i, n in enumerate((2, 2, 1))]


def test_retention_holds_log_and_verify(receiver, world: World, sessions) -> None:
    rx = receiver()
    segs = [s for run in sessions for s in run]
    assert [s.seq for s in segs] == [0, 1, 2, 3, 4]
    with client(rx, world) as c:
        for seg in segs:
            assert put_header(c, seg).status_code == 202
            assert put_payload(c, seg).status_code == 200
    admin = rx.admin_url
    auth = admin_auth(rx)
    second = json.loads(segs[2].header)["session"]
    assert httpx.post(f"{admin}/admin/holds", json={"device": DEV, "session": second,
                                                    "held": True}, headers=auth,
                      timeout=5).status_code == 200
    log_path = rx.store.data_dir / retention_mod.DELETION_LOG
    ret = Retention(rx.store, RetentionPolicy(keep_days=1), log_path, world.receipt_key,
                    rx.running.events)
    future = time.time_ns() + 400 * 86400 * 10**9
    assert ret.pass_once(now_ns=time.time_ns()) == 0  # nothing is a day old yet
    assert ret.pass_once(now_ns=future) == 2  # session 1; session 2 is on hold
    httpx.post(f"{admin}/admin/holds", json={"device": DEV, "session": second, "held": False},
               headers=auth, timeout=5)
    httpx.post(f"{admin}/admin/holds", json={"device": DEV2, "held": True}, headers=auth,
               timeout=5)
    assert httpx.get(f"{admin}/admin/holds", headers=auth,
                     timeout=5).json()["holds"][0]["device"] == DEV2
    assert ret.pass_once(now_ns=future) == 2  # session 2; session 3 holds the head
    assert ret.pass_once(now_ns=future) == 0
    left = sorted(p.name for p in rx.store.device_dir(DEV).iterdir())
    assert left == ["0000000004.hdr.json", "0000000004.payload.age"]
    # The box's view is unchanged: head, receipts, a repeated upload of a deleted segment.
    with client(rx, world) as c:
        assert c.get(f"/v1/devices/{DEV}/head").json()["seq"] == 4
        assert c.get(f"/v1/devices/{DEV}/segments/0/receipt").status_code == 200
        assert put_header(c, segs[0]).status_code == 200
        assert put_header(c, world.b[0]).status_code == 409  # still a fork
    # The deletion log: signed, chained, and it explains verify's missing range.
    log = read_log(log_path, world.receipt_key.public_key())
    assert [(e.first_seq, e.last_seq) for e in log.entries] == [(0, 1), (2, 3)]
    report = verify_dir(rx.store.device_dir(DEV), None, from_seq=0)
    assert [p.kind for p in report.errors] == ["chain_start"]
    explained = explain(report, log)
    assert [e.problem.kind for e in explained] == ["chain_start"]
    assert str(explained[0]).startswith("deleted by retention (seq 0..1, retention: 1 days")
    # A changed or removed line is caught.
    lines = log_path.read_bytes().splitlines(keepends=True)
    log_path.write_bytes(lines[1])
    with pytest.raises(DeletionLogError, match="prev does not match"):
        read_log(log_path, world.receipt_key.public_key())
    log_path.write_bytes(b"".join(lines))
    assert (log_path.stat().st_mode & 0o077) == 0


def test_webhook_retries_are_bounded(tmp_path: Path) -> None:
    import asyncio

    from dualrec_tools.receiver.alerts import Alerter, evaluate, is_open
    from dualrec_tools.receiver.ratelog import RateLimitedLog
    from dualrec_tools.receiver.storage import DeviceFigures

    fig = DeviceFigures("box-1", True, 1, 1, 0, 10, 0, 0, 0, {}, 0, None, 0, False, -1, "0.1")
    cfg = AlertConfig("http://127.0.0.1:9/", backoff_s=0.01)
    monday_noon, sunday_noon = 1796644800.0, 1796558400.0  # 2026-12-07 and 12-06, 12:00 UTC
    assert is_open(monday_noon, cfg.opening_hours) and not is_open(sunday_noon,
                                                                   cfg.opening_hours)
    from dualrec_tools.receiver.alerts import _ForkMemory

    assert set(evaluate([fig], monday_noon, cfg, _ForkMemory())) == {
        ("DualrecBoxSilent", "box-1"), ("DualrecClockUnsynced", "box-1")}
    assert set(evaluate([fig], sunday_noon, cfg, _ForkMemory())) == {
        ("DualrecClockUnsynced", "box-1")}

    class Store:
        receiver_id = "branch"

        def figures(self) -> list[DeviceFigures]:
            return [fig]

    calls: list[dict] = []

    async def refuse_all(body: dict) -> bool:
        calls.append(body)
        return False

    import logging

    alerter = Alerter(Store(), cfg, RateLimitedLog(logging.getLogger("t")),  # type: ignore[arg-type]
                      clock=lambda: monday_noon)
    asyncio.run(alerter.step(refuse_all))
    assert len(calls) == 2 * cfg.retries and alerter.failed == 2 and alerter.sent == 0
    asyncio.run(alerter.step(refuse_all))  # no transition: nothing sent again
    assert len(calls) == 2 * cfg.retries


def test_serve_refuses_to_start_past_the_open_files_limit(tmp_path: Path, world: World) -> None:
    import resource
    import sys

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    r = subprocess.run([sys.executable, "-m", "dualrec_tools.receiver.cli", "serve", "--data",
                        str(tmp_path / "d"), "--keys", str(world.keys), "--listen",
                        "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--limit",
                        f"max_connections={hard + 1}"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "LISTENING" not in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("Error: open-files limit too low")
    assert "Traceback" not in r.stderr
