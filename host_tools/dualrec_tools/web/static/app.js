// dualrec web pages: the dashboard's refresh, and the review player's log sync and timeline.
"use strict";

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
}

function rate(bps) {
  if (bps >= 1e6) return (bps / 1e6).toFixed(1) + " MB/s";
  if (bps >= 1e3) return (bps / 1e3).toFixed(1) + " kB/s";
  return bps + " B/s";
}

async function refreshDevices(table) {
  let data;
  try {
    const r = await fetch("/api/devices", {credentials: "same-origin"});
    if (r.status === 401) { location.href = "/login"; return; }
    data = await r.json();
  } catch (e) { document.getElementById("updated").textContent = "update failed"; return; }
  const body = table.querySelector("tbody");
  body.replaceChildren();
  for (const d of data.devices) {
    const tr = document.createElement("tr");
    tr.id = "dev-" + d.device;
    tr.className = d.silent ? "silent" : "alive";
    tr.dataset.silent = d.silent ? "1" : "0";
    cell(tr, d.device + (d.counter ? " (" + d.counter + ")" : ""));
    cell(tr, d.last_contact + (d.silent_s === null ? "" : " (" + Math.round(d.silent_s) + " s ago)")
         + (d.silent ? " SILENT" : ""), "contact");
    cell(tr, d.backlog + " of " + d.headers);
    cell(tr, rate(d.upload_rate_bps));
    cell(tr, d.clock + (d.clock_error_ms === null ? "" : " ±" + d.clock_error_ms + " ms"));
    cell(tr, d.spool);
    let faults = d.faults.length ? d.faults.join("; ") : "none";
    if (d.reported_faults) {  // the box's own state report, when it has sent one
      faults += "; box reports: " + (d.reported_faults.length ? d.reported_faults.join(", ") : "none");
    }
    cell(tr, faults);
    cell(tr, d.gaps.length ? d.gaps.join(", ") : "none");
    const probs = Object.entries(d.problems).map(([k, v]) => k + " ×" + v).join(", ");
    cell(tr, d.forks + " forks" + (probs ? "; " + probs : ""));
    cell(tr, d.firmware);
    cell(tr, d.cert_expiry + (d.cert_days === null ? "" : " (" + Math.floor(d.cert_days) + " days)"),
         d.cert_days !== null && d.cert_days < 30 ? "bad" : "");
    body.appendChild(tr);
  }
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function setupDashboard() {
  const table = document.getElementById("devices");
  if (!table) return;
  refreshDevices(table);
  setInterval(() => refreshDevices(table), Number(table.dataset.refreshMs) || 5000);
}

function setupPlayer() {
  const video = document.getElementById("video");
  const log = document.getElementById("log");
  if (!log) return;
  const lines = Array.from(log.querySelectorAll("li"));
  const times = lines.map(li => Number(li.dataset.t));
  let current = -1;
  const highlight = t => {
    // the last line at or before t (lines are in time order)
    let lo = 0, hi = times.length - 1, found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (times[mid] <= t + 1e-6) { found = mid; lo = mid + 1; } else hi = mid - 1;
    }
    if (found === current) return;
    if (current >= 0) lines[current].classList.remove("current");
    current = found;
    if (found >= 0) {
      lines[found].classList.add("current");
      lines[found].scrollIntoView({block: "nearest"});
    }
    log.dataset.current = String(found);
  };
  // While the file is still being made it streams and cannot seek: a seek asked for then is
  // kept and done once the finished file is in the player.
  let pending = null;
  const seek = t => {
    if (video.dataset.complete === "1") video.currentTime = Math.max(0, t);
    else pending = t;
    highlight(t);
  };
  lines.forEach((li, i) => li.addEventListener("click", () => { if (video) seek(times[i]); }));
  if (!video) return;
  const waitComplete = async () => {
    while (video.dataset.complete !== "1") {
      await new Promise(r => setTimeout(r, 1000));
      try {
        const r = await fetch(video.dataset.state, {credentials: "same-origin"});
        if (!r.ok || !(await r.json()).ready) continue;
      } catch (e) { continue; }
      const t = pending !== null ? pending : video.currentTime, playing = !video.paused;
      video.addEventListener("loadedmetadata", () => {
        video.currentTime = t;
        if (playing) video.play();
        video.dataset.complete = "1";
        document.getElementById("streaming").hidden = true;
      }, {once: true});
      pending = null;
      video.src = video.src.split("?")[0] + "?complete=" + Date.now();
      return;
    }
  };
  waitComplete();
  const timeline = document.getElementById("timeline");
  const playhead = document.getElementById("playhead");
  const preparing = document.getElementById("preparing");
  video.addEventListener("loadeddata", () => { preparing.hidden = true; });
  video.addEventListener("error", () => {
    preparing.textContent = "The recording cannot be played (see the service's log).";
  });
  // the session's own duration until the player knows the file's
  const duration = () => (isFinite(video.duration) && video.duration > 0
    ? video.duration : Number(timeline.dataset.duration));
  const place = () => {
    const d = duration();
    if (!isFinite(d) || d <= 0) return;
    for (const m of timeline.querySelectorAll(".mark")) {
      const f = Math.min(Math.max(Number(m.dataset.t) / d, 0), 1);
      m.style.left = (100 * f) + "%";
      m.classList.toggle("end", f > 0.8);  // its label to the left of its line, not cut off
    }
  };
  for (const m of timeline.querySelectorAll(".mark"))
    m.addEventListener("click", () => seek(Number(m.dataset.t)));
  video.addEventListener("loadedmetadata", place);
  place();
  // every frame rather than on timeupdate (4 Hz): the highlight keeps up with the picture
  const tick = () => {
    highlight(video.currentTime);
    const d = duration();
    if (isFinite(d) && d > 0) playhead.style.left = (100 * Math.min(video.currentTime / d, 1)) + "%";
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
  // the page's own watermark beside the burned-in one: the viewer and the live time
  const overlay = document.getElementById("overlay");
  const stamp = () => { overlay.textContent = overlay.dataset.viewer + " " + new Date().toISOString().slice(0, 19).replace("T", " ") + " UTC"; };
  stamp();
  setInterval(stamp, 1000);
}

document.addEventListener("DOMContentLoaded", () => { setupDashboard(); setupPlayer(); });
