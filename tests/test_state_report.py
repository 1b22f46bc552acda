"""The box's state report (docs/UPLOAD.md "State report"): a real uplink reports its spool use and
fault names over loopback mutual TLS; the receiver keeps the latest per device and exports
dualrec_device_spool_used_ratio; a malformed report is 400 and stores nothing; a box can report
only for itself; the dashboard shows it."""
# ruff: noqa: F811 (the fixtures come from test_receiver and test_uplink)

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dualrec.uplink import Uplink
from dualrec_tools.receiver.report import REPORT_MAX
from dualrec_tools.receiver.storage import DeviceReport
from dualrec_tools.web.dashboard import spool_text
from test_receiver import DEV, DEV2, World, client, receiver, world  # noqa: F401
from test_uplink import DEV as BOX_DEV
from test_uplink import FAST_BPS, Box, box, template, wait_for  # noqa: F401

pytestmark = pytest.mark.timeout(60)
GiB = 2**30


def _good(**change: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"spool_used_bytes": 3 * GiB, "spool_quota_bytes": 4 * GiB,
                           "spool_free_bytes": 10 * GiB, "unsealed_bytes": 1024,
                           "faults": ["camera", "uplink:uplink-headers"], "firmware": "0.1.0",
                           "utc_ns": 1_800_000_000_000_000_000}
    doc.update(change)
    return {k: v for k, v in doc.items() if v is not ...}


def _uplink(box: Box, url: str, **kwargs: Any) -> Uplink:
    """Box.uplink's settings, with the state report's arguments."""
    cfg = box.uplink_cfg.model_copy(update={"url": url, "timeout_s": 5, "backoff_max_s": 1,
                                            "bandwidth_bps": FAST_BPS})
    up = Uplink(box.spool, cfg, BOX_DEV, report=box.events.append,
                on_fault=box.faults.append, **kwargs)
    box._uplinks.append(up)  # stopped by the fixture
    up.start()
    return up


def _metrics(url: str) -> dict[str, list]:
    text = httpx.get(url, timeout=5).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(m: dict[str, list], name: str, device: str) -> float | None:
    return next((s.value for s in m.get(name, []) if s.labels.get("device") == device), None)


def test_uplink_reports_state_and_metrics_show_it(box: Box) -> None:
    """A real Uplink with a state callable reports at start over its mTLS client; the receiver
    keeps it and /metrics carries the ratio, free bytes and fault count."""
    rx = box.receiver()
    state = {"spool_used_bytes": 900, "spool_quota_bytes": 1000, "spool_free_bytes": 5000,
             "faults": ["uplink:uplink-headers", "Camera Lost!"]}
    up = _uplink(box, rx.url, state=lambda: dict(state), report_interval_s=0.2)
    wait_for("a state report at the receiver", lambda: rx.store.report(BOX_DEV) is not None)
    got = rx.store.report(BOX_DEV)
    assert got is not None
    assert (got.spool_used_bytes, got.spool_quota_bytes, got.spool_free_bytes) == (900, 1000,
                                                                                   5000)
    assert got.unsealed_bytes is None  # omitted by the box: kept as unknown
    assert got.faults == ("uplink:uplink-headers", "camera_lost_")  # made safe by the box
    assert got.firmware and got.utc_ns > 0
    # reported again on the interval: a later figure replaces the earlier one
    state["spool_used_bytes"] = 500
    wait_for("the next report", lambda: rx.store.report(BOX_DEV).spool_used_bytes == 500)
    m = _metrics(f"{rx.admin_url}/metrics")
    assert _value(m, "dualrec_device_spool_used_ratio", BOX_DEV) == pytest.approx(0.5)
    assert _value(m, "dualrec_device_spool_free_bytes", BOX_DEV) == 5000
    assert _value(m, "dualrec_device_faults", BOX_DEV) == 2
    assert _value(m, "dualrec_device_last_report_timestamp_seconds", BOX_DEV) > 0
    assert up.reports_sent >= 2
    box.wait_drained()  # the uploads went on as before
    assert "fault" not in box.kinds()


def test_failing_reports_never_disturb_uploads(box: Box) -> None:
    """A state callable that raises is logged, not a fault; the segments still drain."""
    rx = box.receiver()

    def broken() -> dict[str, Any]:
        raise OSError("spool usage unreadable")

    up = _uplink(box, rx.url, state=broken, report_interval_s=0.1)
    box.wait_drained()
    assert up.reports_sent == 0 and rx.store.report(BOX_DEV) is None
    assert "fault" not in box.kinds() and box.faults == []


def test_receiver_stores_a_valid_report(receiver, world: World) -> None:
    rx = receiver()
    assert rx.store.report(DEV) is None
    with client(rx, world) as c:
        r = c.put(f"/v1/devices/{DEV}/report", json=_good())
        assert r.status_code == 204, r.text
    got = rx.store.report(DEV)
    assert got is not None and got.used_ratio == pytest.approx(0.75)
    assert got.faults == ("camera", "uplink:uplink-headers") and got.unsealed_bytes == 1024
    assert got.received_ns > 0
    m = _metrics(f"{rx.admin_url}/metrics")
    assert _value(m, "dualrec_device_spool_used_ratio", DEV) == pytest.approx(0.75)
    assert _value(m, "dualrec_device_spool_used_ratio", DEV2) is None  # never reported


@pytest.mark.parametrize("body", [
    b"not json",
    b"[1, 2]",
    json.dumps(_good(spool_used_bytes=-1)).encode(),
    json.dumps(_good(spool_quota_bytes=1.5)).encode(),
    json.dumps(_good(spool_free_bytes=True)).encode(),
    json.dumps(_good(spool_free_bytes="5")).encode(),
    json.dumps(_good(utc_ns=...)).encode(),
    json.dumps(_good(faults="camera")).encode(),
    json.dumps(_good(faults=["Camera"])).encode(),
    json.dumps(_good(faults=["x" * 65])).encode(),
    json.dumps(_good(faults=[f"f{i}" for i in range(33)])).encode(),
    json.dumps(_good(faults=[["nested"]])).encode(),
    json.dumps(_good(firmware="")).encode(),
    json.dumps(_good(customer="Jane Doe")).encode(),
    json.dumps(_good(spool_used_bytes=2**63)).encode(),
    b'{"spool_used_bytes": 1' + b"0" * 40 + b"}",
    b"[" * 100 + b"]" * 100,
], ids=lambda b: b[:40].decode(errors="replace"))
def test_malformed_report_is_400_and_stores_nothing(receiver, world: World,
                                                    body: bytes) -> None:
    rx = receiver()
    with client(rx, world) as c:
        r = c.put(f"/v1/devices/{DEV}/report", content=body,
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed", r.text
    assert rx.store.report(DEV) is None


def test_oversized_report_is_refused(receiver, world: World) -> None:
    rx = receiver()
    body = json.dumps(_good(firmware="1" * 10)) + " " * REPORT_MAX
    with client(rx, world) as c:
        r = c.put(f"/v1/devices/{DEV}/report", content=body.encode(),
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and rx.store.report(DEV) is None


def test_report_for_another_device_is_refused(receiver, world: World) -> None:
    rx = receiver()
    with client(rx, world, DEV) as c:
        r = c.put(f"/v1/devices/{DEV2}/report", json=_good())
    assert r.status_code == 403 and r.json()["error"] == "device_mismatch"
    assert rx.store.report(DEV2) is None and rx.store.report(DEV) is None


def test_dashboard_spool_text() -> None:
    assert spool_text(None) == "not reported"
    rep = DeviceReport(spool_used_bytes=GiB, spool_quota_bytes=4 * GiB,
                       spool_free_bytes=3 * GiB, unsealed_bytes=None, faults=("camera",),
                       firmware="0.1.0", utc_ns=1)
    assert spool_text(rep) == "25 % of quota, 3.0 GiB free"


def test_gateway_state_figures(tmp_path) -> None:
    """The gateway's callable: spool use and quota, unsealed bytes, active fault keys."""
    from types import SimpleNamespace

    from dualrec.gateway import Gateway

    gw = SimpleNamespace(
        spool=SimpleNamespace(usage=lambda: (700, 9000)),
        quota=SimpleNamespace(quota=1000),
        sealing=SimpleNamespace(backlog=lambda: (2, 4096)),
        faults=SimpleNamespace(active={"uplink:uplink-headers": {}, "camera": {}}))
    assert Gateway._report_state(gw) == {  # type: ignore[arg-type]
        "spool_used_bytes": 700, "spool_quota_bytes": 1000, "spool_free_bytes": 9000,
        "unsealed_bytes": 4096, "faults": ["camera", "uplink:uplink-headers"]}
