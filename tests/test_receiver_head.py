"""GET /v1/devices/{device}/head: the newest header the receiver holds for the device on the
connection (base64 bytes, seq, hash), or 404; another device's head is refused."""
# ruff: noqa: F811 (the fixtures come from test_receiver)

from __future__ import annotations

import base64

from dualrec_tools.receiver.storage import Storage
from dualrec_tools.receiver.store import ReceiverStore
from test_receiver import (  # noqa: F401
    DEV,
    DEV2,
    World,
    client,
    put_header,
    put_payload,
    receiver,
    world,
)


def test_head_is_the_newest_header_of_the_device_itself(receiver, world: World) -> None:
    rx = receiver()
    assert isinstance(rx.store, Storage) and isinstance(rx.store, ReceiverStore)
    with client(rx, world) as c:
        r = c.get(f"/v1/devices/{DEV}/head")
        assert r.status_code == 404 and r.json()["error"] == "not_stored"
        for seg in world.a[:3]:
            assert put_header(c, seg).status_code == 202
        assert put_payload(c, world.a[0]).status_code == 200
        r = c.get(f"/v1/devices/{DEV}/head")
        assert r.status_code == 200
        body = r.json()
        assert body["seq"] == 2 and base64.b64decode(body["header"]) == world.a[2].header
        assert body["header_sha256"] == world.a[2].sha
        other = c.get(f"/v1/devices/{DEV2}/head")
        assert other.status_code == 403 and other.json()["error"] == "device_mismatch"
