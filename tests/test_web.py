"""`dualrec-web` driven in Debian's headless Chromium (Selenium, /usr/bin/chromedriver) against a
receiver data directory holding a box's real sealed segments, served on loopback: login; the
dashboard lists the boxes and a box going silent turns red within the alert interval; sessions
listed and filtered; a session plays, a click on a log line seeks the video to the line's stamp,
the highlighted line follows playback; no customer number in any page, API answer or log unless
unmasked with a reason, which the audit log then holds; every route refused without login; CSRF
and the login rate limit. Screenshots are written under the test's tmp dir (not committed)."""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dualrec import numbers
from dualrec_tools.web.audit import verify_log
from web_world import DEVICE, PASSWORD, SILENT_BOX, World, build, end, spawn, start, stop

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ALERT_S, REFRESH_S = 3.0, 0.5
FRAME_S = 0.1  # the recording is 10 fps
pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.xdist_group("web"),  # one world, one server, one Chromium for the module
    pytest.mark.skipif(not (CHROMIUM.exists() and DRIVER.exists()),
                       reason="Debian's chromium and chromium-driver (scripts/setup-system.sh)"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build(tmp_path_factory.mktemp("web"))
    start(w, ALERT_S, REFRESH_S)
    yield w
    stop(w)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("screenshots")
    yield path
    print(f"\nscreenshots in {path}: {sorted(p.name for p in path.glob('*.png'))}")


@pytest.fixture(scope="module")
def browser(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--mute-audio",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def browser_login(driver: Any, world: World, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(world.url + "/login")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "submit").click()
    wait(lambda: driver.find_elements(By.ID, "who"), 10, "the logged-in page")


# --- plain HTTP ----------------------------------------------------------------------------------


def request(world: World, method: str, path: str, body: dict[str, str] | None = None,
            cookies: dict[str, str] | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    host, port = world.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    hdrs = dict(headers or {})
    if cookies:
        hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    data = None
    if body is not None:
        data = urllib.parse.urlencode(body)
        hdrs["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, data, hdrs)
    r = conn.getresponse()
    text = r.read().decode("utf-8", "replace")
    got: dict[str, str] = {}
    for k, v in r.getheaders():  # Set-Cookie comes once per cookie
        got[k.lower()] = f"{got[k.lower()]}, {v}" if k.lower() in got else v
    out = (r.status, got, text)
    conn.close()
    return out


def _set_cookies(headers: dict[str, str]) -> dict[str, str]:
    return dict(re.findall(r"(dualrec_web[a-z_]*)=([^;]+)", headers.get("set-cookie", "")))


def http_login(world: World, name: str, password: str = PASSWORD) -> tuple[int, dict[str, str]]:
    _, h, page = request(world, "GET", "/login")
    pre = re.search(r'name="pre" value="([^"]+)"', page)
    assert pre
    status, h2, _ = request(world, "POST", "/login", {"pre": pre.group(1), "name": name,
                                                      "password": password},
                            cookies=_set_cookies(h))
    return status, _set_cookies(h2)


def session_path(world: World) -> str:
    return f"/sessions/{DEVICE}/{world.session_a}"


ROUTES = [("GET", "/"), ("GET", "/api/devices"), ("GET", "/sessions"),
          ("GET", "/api/sessions"), ("GET", "/sessions/{d}/{s}"), ("GET", "/api/sessions/{d}/{s}"),
          ("GET", "/api/sessions/{d}/{s}/media"),
          ("GET", "/media/{d}/{s}.mp4"), ("POST", "/sessions/{d}/{s}/unmask"),
          ("GET", "/static/app.js"), ("GET", "/static/style.css"), ("POST", "/logout"),
          ("GET", "/no/such/page")]


def test_every_route_refused_without_login(world: World) -> None:
    from dualrec_tools.web.app import WebConfig, make_app

    app = make_app(WebConfig(world.data, world.base / "probe-state", [], tz=None))  # type: ignore[arg-type]
    declared = {(r.method, r.resource.canonical) for r in app.router.routes()
                if r.method != "HEAD"}
    listed = {(m, p.replace("{d}", "{device}").replace("{s}", "{session}")) for m, p in ROUTES}
    listed |= {("GET", "/login"), ("POST", "/login"), ("GET", "/static/{name}")}
    assert declared <= listed, f"routes not covered: {declared - listed}"
    for method, path in ROUTES:
        path = path.format(d=DEVICE, s=world.session_a)
        for cookies in (None, {"dualrec_web": "forged-token"}):
            status, headers, body = request(world, method, path, {"reason": "x" * 20}
                                            if method == "POST" else None, cookies)
            assert status in (303, 401), (method, path, status)
            if status == 303:
                assert headers["location"] == "/login"
            assert world.session_a not in body and "MARK" not in body and "video" not in body


def test_login_rate_limited_and_csrf_required(world: World) -> None:
    for _ in range(5):
        status, _ = http_login(world, "mallory", "wrong password!")
        assert status == 401
    status, _ = http_login(world, "mallory", "wrong password!")
    assert status == 429
    status, _ = http_login(world, "ian", "not his password")
    assert status == 401
    status, cookies = http_login(world, "ada")
    assert status == 303 and "dualrec_web" in cookies
    # a logged-in POST without the session's CSRF token is refused, and nothing is unmasked
    status, _, _ = request(world, "POST", session_path(world) + "/unmask",
                           {"reason": "checking a complaint"}, cookies)
    assert status == 403
    status, _, body = request(world, "GET", "/api" + session_path(world), cookies=cookies)
    assert status == 200 and not json.loads(body)["unmasked"]
    # every answer, a 404 included, carries the security headers
    for path, code in (("/sessions", 200), ("/no/such/page", 404),
                       (f"/sessions/{DEVICE}/20250301T090000Z-ffffff", 404)):
        status, headers, _ = request(world, "GET", path, cookies=cookies)
        assert status == code, path
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"
    # a role sees only its pages: IT has the dashboard, not the review
    status, it = http_login(world, "ian")
    assert request(world, "GET", "/api/devices", cookies=it)[0] == 200
    for path in ("/sessions", "/api/sessions", session_path(world),
                 f"/media/{DEVICE}/{world.session_a}.mp4"):
        assert request(world, "GET", path, cookies=it)[0] == 403, path
    # cookies: HttpOnly and SameSite=Strict (Secure only over TLS: this test is plain HTTP)
    _, h, _ = request(world, "GET", "/login")
    assert "HttpOnly" in h["set-cookie"] and "SameSite=Strict" in h["set-cookie"]


def _row(browser: Any, device: str) -> dict[str, Any] | None:
    """A dashboard row read in one script (the table is redrawn at every refresh)."""
    return browser.execute_script("""
        const tr = document.getElementById('dev-' + arguments[0]);
        if (!tr) return null;
        const cell = tr.querySelector('td.contact');
        return {silent: tr.dataset.silent === '1', text: tr.innerText,
                color: getComputedStyle(cell).color};
    """, device)


def test_dashboard_lists_boxes_and_a_silent_box_turns_red(world: World, browser: Any,
                                                          shots: Path) -> None:
    browser_login(browser, world, "ian")
    world.store.touch(SILENT_BOX)
    touched = time.monotonic()
    browser.get(world.url + "/")
    row = wait(lambda: _row(browser, SILENT_BOX), 5, "the box's row")
    assert not row["silent"], "just touched, the box must not be red"
    assert row["color"] != "rgb(176, 0, 32)"
    browser.save_screenshot(str(shots / "dashboard-alive.png"))
    # red once the interval has passed: at the next refresh, with room for a loaded machine
    limit = ALERT_S + REFRESH_S + 4
    wait(lambda: (_row(browser, SILENT_BOX) or {}).get("silent"), limit,
         "the silent box to turn red")
    elapsed = time.monotonic() - touched
    assert ALERT_S <= elapsed <= limit
    row = _row(browser, SILENT_BOX)
    assert row and row["color"] == "rgb(176, 0, 32)" and "SILENT" in row["text"]
    box = _row(browser, DEVICE)
    assert box is not None
    text = box["text"]
    assert "Counter 1" in text and "0.1.0" in text and "not reported" in text
    # the camera fault sealed in an idle segment, its number masked
    assert "camera: no frames 6217 **** **** 4210" in text
    _no_numbers("dashboard in Chromium", browser.page_source)
    browser.save_screenshot(str(shots / "dashboard-silent.png"))
    print(f"silent box red after {elapsed:.1f} s (alert interval {ALERT_S} s)")


def test_sessions_listed_and_filtered(world: World, browser: Any, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    browser_login(browser, world, "ada")

    def listed(query: str = "") -> list[str]:
        browser.get(world.url + "/sessions" + query)
        return [r.get_attribute("data-session")
                for r in browser.find_elements(By.CSS_SELECTOR, "tr.session")]

    assert listed() == [world.session_b, world.session_a]  # newest first; idle ones not listed
    table = browser.find_element(By.ID, "sessions").text
    assert "T1001" in table and "T07" in table and "open_account" in table
    assert "incomplete: id_check" in table and "verified" in table
    assert "UTC" in table and "CST" in table  # local (Asia/Shanghai) and UTC starts
    _no_numbers("session list in Chromium", browser.page_source)
    browser.save_screenshot(str(shots / "sessions.png"))
    assert listed("?txn=T1002") == [world.session_b]
    assert listed("?teller=t07") == [world.session_a]
    assert listed("?completeness=incomplete") == [world.session_b]
    assert listed("?completeness=complete") == [world.session_a]
    assert listed("?business=deposit") == [world.session_b]
    assert listed("?counter=counter%201") == [world.session_b, world.session_a]
    assert listed("?counter=box-0009") == []
    assert listed("?from=2000-01-01&to=2000-01-02") == []
    today = time.strftime("%Y-%m-%d")
    assert len(listed(f"?from=2000-01-01&to=2100-01-01&x={today}")) == 2


def _log_state(browser: Any) -> dict[str, Any]:
    return browser.execute_script("""
        const v = document.getElementById('video');
        const log = document.getElementById('log');
        const cur = log.querySelector('li.current');
        return {t: v.currentTime, paused: v.paused, ready: v.readyState, seeking: v.seeking,
                current: cur ? cur.id : null, current_t: cur ? Number(cur.dataset.t) : null,
                times: Array.from(log.querySelectorAll('li')).map(li => Number(li.dataset.t))};
    """)


def world_claps() -> list[float]:
    from test_verify import CLAPS_A, NS

    return [c / NS for c in CLAPS_A]


_REGION = """
    const v = document.getElementById('video');
    const c = document.createElement('canvas');
    c.width = v.videoWidth; c.height = v.videoHeight;
    const g = c.getContext('2d');
    g.drawImage(v, 0, 0);
    const [x, y, w, h] = arguments[0].map((f, i) => Math.floor(f * (i % 2 ? c.height : c.width)));
    const d = g.getImageData(x, y, w, h).data;
    const grey = [];
    for (let i = 0; i < d.length; i += 4) grey.push((d[i] + d[i + 1] + d[i + 2]) / 3);
    const mean = grey.reduce((a, b) => a + b, 0) / grey.length;
    const sd = Math.sqrt(grey.reduce((a, b) => a + (b - mean) ** 2, 0) / grey.length);
    return [mean, sd];
"""


def _region(browser: Any, x: float, y: float, w: float, h: float) -> tuple[float, float]:
    """Mean and standard deviation of the grey level of a part of the frame on screen
    (fractions of its width and height)."""
    mean, sd = browser.execute_script(_REGION, [x, y, w, h])
    return mean, sd


def _brightness(browser: Any) -> float:
    """Mean grey level of the middle of the frame (the watermark is in the corners)."""
    return _region(browser, 0.375, 0.375, 0.25, 0.25)[0]


def test_session_plays_seeks_and_follows_the_log(world: World, browser: Any,
                                                 shots: Path) -> None:
    from selenium.webdriver.common.by import By

    browser_login(browser, world, "ada")
    browser.get(world.url + session_path(world))
    wait(lambda: _log_state(browser)["ready"] >= 2, 60, "the video to load")
    # the finished file is in the player (the first view streams while ffmpeg writes)
    wait(lambda: browser.execute_script(
        "const v = document.getElementById('video');"
        "return v.dataset.complete === '1' && v.readyState >= 2"), 60, "the finished file")
    # this was the first view: it streamed, then the page switched to the finished file
    assert "?complete=" in browser.execute_script("return document.getElementById('video').src")
    assert not browser.find_element(By.ID, "preparing").is_displayed()
    # plays: currentTime advances
    browser.execute_script("document.getElementById('video').play()")
    t0 = _log_state(browser)["t"]
    wait(lambda: _log_state(browser)["t"] > t0 + 1.0, 10, "currentTime to advance")
    decoded = browser.execute_script("const v = document.getElementById('video');"
                                     "return [v.webkitVideoDecodedByteCount,"
                                     " v.webkitAudioDecodedByteCount];")
    assert decoded[0] > 0 and decoded[1] > 0, decoded  # picture and sound both decoded
    # the highlighted line follows playback: at every sample, the last line at or before t
    seen = set()
    for _ in range(20):
        s = _log_state(browser)
        expect = max((i for i, x in enumerate(s["times"]) if x <= s["t"] + 1e-6), default=None)
        if s["current"] is not None and expect is not None:
            got = int(s["current"].removeprefix("line-"))
            # the sample reads t after the frame callback ran: at most one line behind
            assert got in (expect, expect - 1), (s["t"], got, expect)
            seen.add(got)
        time.sleep(0.1)
    assert len(seen) >= 2, "the highlight moved with playback"
    browser.save_screenshot(str(shots / "session-playing.png"))
    browser.execute_script("document.getElementById('video').pause()")
    # a click on a line seeks to its stamp (within one frame) and highlights it
    lines = browser.find_elements(By.CSS_SELECTOR, "#log li")
    errors: list[float] = []
    for li in (lines[7], lines[2], lines[-3]):
        stamp = float(li.get_attribute("data-t"))
        li.click()
        # read back once the seek has completed (the frame at the stamp is decoded)
        state = wait(lambda s=stamp: (lambda st: st if abs(st["t"] - s) <= FRAME_S
                                      and not st["seeking"] else None)(_log_state(browser)),
                     5, "the seek")
        assert abs(state["t"] - stamp) <= FRAME_S
        assert state["current_t"] == stamp
        errors.append(abs(state["t"] - stamp))
    # the picture agrees: a MARK line's stamp is a clapper instant, whose frame is white (the
    # recording's other frames are at most grey 119); the frame shown after the click is read
    # back through a canvas
    for n, clap in enumerate(world_claps(), 1):
        mark = next(li for li in lines if f"MARK {n} " in li.text)
        mark.click()
        wait(lambda c=clap: abs(_log_state(browser)["t"] - c) <= FRAME_S
             and not _log_state(browser)["seeking"], 5, f"the seek to MARK {n}")
        assert _brightness(browser) > 200, f"MARK {n}: the frame shown is not the clapper's"
        lines[0].click()  # 0.4 s: an ordinary frame
        wait(lambda: not _log_state(browser)["seeking"], 5, "the seek to line 1")
        assert _brightness(browser) < 150
    # the watermark is burned into the picture: text in the top left corner of every frame
    # (the recording's frames are one flat grey), nothing in the middle
    _, corner_sd = _region(browser, 0.0, 0.0, 0.6, 0.2)
    _, middle_sd = _region(browser, 0.375, 0.375, 0.25, 0.25)
    assert corner_sd > 20 and middle_sd < 5, (corner_sd, middle_sd)
    next(li for li in lines if "MARK 2 " in li.text).click()
    wait(lambda: not _log_state(browser)["seeking"], 5, "the seek to MARK 2")
    browser.save_screenshot(str(shots / "session-seek.png"))
    print(f"seek error read back from currentTime: max {max(errors) * 1000:.3f} ms "
          f"(one frame {FRAME_S * 1000:.0f} ms); highlight seen on {len(seen)} lines")
    # events on the timeline, placed once the duration is known
    marks = browser.find_elements(By.CSS_SELECTOR, "#timeline .mark")
    assert {m.text for m in marks} >= {"pre-roll start", "stop"}
    assert all(m.value_of_css_property("left").endswith("px") for m in marks)


def _no_numbers(where: str, text: str) -> None:
    found = numbers.find(text)
    assert not found, f"{where}: unmasked customer numbers {[text[f.start:f.end] for f in found]}"


def test_numbers_masked_everywhere_until_unmasked_with_a_reason(world: World, browser: Any,
                                                                shots: Path) -> None:
    from selenium.webdriver.common.by import By

    # every page and API answer, as an auditor who can unmask but has not
    status, cookies = http_login(world, "ada")
    assert status == 303
    for path in ("/", "/api/devices", "/sessions", "/api/sessions", session_path(world),
                 "/api" + session_path(world), f"/sessions/{DEVICE}/{world.session_b}",
                 f"/api/sessions/{DEVICE}/{world.session_b}"):
        status, _, body = request(world, "GET", path, cookies=cookies)
        assert status == 200, path
        _no_numbers(path, body)
    # a number typed into a search lands in the access log's request line: masked there too
    status, _, body = request(world, "GET", "/api/sessions?txn=6217008792174210", cookies=cookies)
    assert status == 200 and json.loads(body) == {"sessions": []}
    masked = json.loads(request(world, "GET", "/api" + session_path(world), cookies=cookies)[2])
    assert any("6217 **** **** 4210" in line["text"] for line in masked["lines"])

    # bob may review but not unmask
    status, bob = http_login(world, "bob")
    _, _, page = request(world, "GET", session_path(world), cookies=bob)
    assert 'id="unmask"' not in page
    csrf = re.search(r'data-csrf="([^"]+)"', page)
    assert csrf
    status, _, _ = request(world, "POST", session_path(world) + "/unmask",
                           {"reason": "I would like to see", "csrf": csrf.group(1)}, bob)
    assert status == 403

    browser_login(browser, world, "ada")
    browser.get(world.url + session_path(world))
    _no_numbers("session page in Chromium", browser.page_source)
    assert browser.find_elements(By.ID, "masked")
    # a reason is required (the browser's minlength, and the server's)
    ada_csrf = re.search(r'data-csrf="([^"]+)"',
                         request(world, "GET", session_path(world), cookies=cookies)[2])
    assert ada_csrf
    status, _, _ = request(world, "POST", session_path(world) + "/unmask",
                           {"reason": "short", "csrf": ada_csrf.group(1)}, cookies)
    assert status == 400
    reason = "complaint 2025-118: customer disputes the card number used"
    browser.find_element(By.ID, "reason").send_keys(reason)
    browser.find_element(By.ID, "unmask-submit").click()
    wait(lambda: browser.find_elements(By.ID, "unmasked"), 10, "the unmasked page")
    shown = numbers.find(browser.find_element(By.ID, "log").text)
    assert {f.kind for f in shown} == {"id", "card"}
    browser.save_screenshot(str(shots / "session-unmasked.png"))
    # the audit log: who, when, what, reason; a hash chain intact
    audit = world.state / "audit.log"
    entries = [json.loads(x) for x in audit.read_text().splitlines()]
    unmasks = [e for e in entries if e["action"] == "unmask"]
    assert len(unmasks) == 1
    e = unmasks[0]
    assert (e["user"], e["device"], e["session"], e["reason"]) == (
        "ada", DEVICE, world.session_a, reason)
    assert e["at"].endswith("+00:00")
    assert verify_log(audit) == []
    assert oct(audit.stat().st_mode & 0o777) == "0o600"
    assert "view" in {e["action"] for e in entries}
    # unmasked for ada only, and only this session
    _no_numbers("bob's view", request(world, "GET", "/api" + session_path(world),
                                      cookies=bob)[2])
    _no_numbers("another session", request(world, "GET",
                                           f"/api/sessions/{DEVICE}/{world.session_b}",
                                           cookies=cookies)[2])
    # the service's own log never carries a number, even after an unmasking
    assert world.log_file is not None
    log_text = world.log_file.read_text()
    assert "unmask user=ada" in log_text and "/api/sessions?txn=6217 **** **** 4210" in log_text
    _no_numbers("web log", log_text)
    # decrypted media in the cache: only the service's user may read it
    cached = list((world.state / "cache").glob("*.mp4"))
    assert cached and all(p.stat().st_mode & 0o077 == 0 for p in cached)
    assert (world.state / "cache").stat().st_mode & 0o077 == 0


def test_media_streams_first_then_serves_the_finished_file(world: World) -> None:
    """The first request gets the transcode as ffmpeg writes it (fragmented MP4, no ranges);
    once ready, the cached plain MP4 with ranges; both with the session's timestamps."""
    import subprocess

    _, bob = http_login(world, "bob")
    path = f"/media/{DEVICE}/{world.session_b}.mp4"
    status, headers, _ = request(world, "GET", path, cookies=bob)
    assert status == 200 and headers["accept-ranges"] == "none"
    wait(lambda: json.loads(request(world, "GET", f"/api/sessions/{DEVICE}/{world.session_b}"
                                    "/media", cookies=bob)[2])["ready"], 30, "the cached file")
    host, port = world.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    conn.request("GET", path, headers={"Cookie": "; ".join(f"{k}={v}" for k, v in bob.items()),
                                       "Range": "bytes=0-"})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    assert r.status == 206 and r.getheader("Accept-Ranges") == "bytes"
    assert body[4:8] == b"ftyp" and body.find(b"moov") < body.find(b"mdat")  # index first
    out = world.base / "b.mp4"
    out.write_bytes(body)
    first = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries",
                            "packet=pts_time", "-of", "csv=p=0", "-read_intervals", "%+#1",
                            str(out)], capture_output=True, text=True, check=True).stdout
    assert float(first.split()[0]) == 0.0  # media time zero is the session's origin
    streams = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name",
                              "-of", "csv=p=0", str(out)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert streams == ["h264", "aac"]  # video and audio, as Chromium plays them in MP4


def test_labels_kept_across_restarts(world: World) -> None:
    """Once listed, a session's labels come from STATE/labels.db: an archive opened without the
    identity (a restart that decrypts nothing) still has them."""
    from dualrec_tools.web.archive import Archive

    _, cookies = http_login(world, "bob")
    assert request(world, "GET", "/api/sessions", cookies=cookies)[0] == 200
    archive = Archive(world.data, [], labels_cache=world.state / "labels.db")
    try:
        rows = {r.info.session: r.txn for r in archive.sessions()}
    finally:
        archive.close()
    assert rows[world.session_a].labels == {"txn": "T1001", "teller": "T07",
                                            "business": "open_account"}
    assert rows[world.session_b].completeness == "incomplete: id_check"
    assert (world.state / "labels.db").stat().st_mode & 0o077 == 0


def test_tls_and_secure_cookies(world: World) -> None:
    """Over TLS (--tls-cert/--tls-key) every cookie is Secure as well."""
    import ssl

    from dualrec_tools.pki import cert_pem, issue, key_pem, make_ca

    ca_key, ca_cert = make_ca("web test")
    key, cert = issue(ca_key, ca_cert, "web", server_names=["127.0.0.1"])
    (world.base / "web.crt").write_bytes(cert_pem(cert))
    (world.base / "web.key").write_bytes(key_pem(key))
    proc, port = spawn(world, "--tls-cert", str(world.base / "web.crt"), "--tls-key",
                       str(world.base / "web.key"), log_name="web-tls")
    try:
        ctx = ssl.create_default_context(cadata=cert_pem(ca_cert).decode())
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        conn.request("GET", "/login")
        r = conn.getresponse()
        cookie = r.getheader("Set-Cookie") or ""
        r.read()
        assert r.status == 200 and "Secure" in cookie and "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        conn.request("GET", "/api/sessions")
        r = conn.getresponse()
        assert r.status == 401 and world.session_a not in r.read().decode()
        conn.close()
    finally:
        end(proc)
