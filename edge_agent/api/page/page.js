// The device page: health, levels, listening, the timeline, transcripts and
// recordings of this one device, read from its HTTP API. No framework, no build
// step. The token stays in sessionStorage (this tab only) and goes out only as a
// bearer header; <audio> and EventSource use short-lived signed URLs instead.
"use strict";

const TOKEN_KEY = "edge-agent-token";
const DB_FLOOR = -60; // the meter's left edge, in dBFS
const POLL_MS = { status: 2000, segments: 5000, transcripts: 3000, recordings: 3000 };

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY);
let timers = [];
let levels = null; // the EventSource of /v1/levels
let connected = false;
let deviceTime = null; // the device's clock at the last status, in ms since the epoch
let view = { from: 0, to: 1 }; // the timeline's span, ms since the epoch

class AuthError extends Error {}

// -- talking to the device ----------------------------------------------------

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function api(path, method = "GET") {
  const response = await fetch(path, {
    method, cache: "no-store", headers: { Authorization: `Bearer ${token}` },
  });
  if (response.status === 401) throw new AuthError(await errorText(response));
  if (!response.ok) throw new Error(await errorText(response));
  return method === "HEAD" ? response : response.json();
}

// A URL of a media route that needs no header: signed by the device, short-lived.
async function signed(pathWithQuery) {
  const answer = await api(`/v1/media-url?path=${encodeURIComponent(pathWithQuery)}`);
  return answer.url;
}

function text(parent, tag, content, className) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (className) el.className = className;
  parent.appendChild(el);
  return el;
}

const iso = (ms) => new Date(ms).toISOString();
const clock = (utc) => (utc || "").replace("T", " ").replace(/\.\d+Z$/, "Z");
const mb = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`;

function duration(seconds) {
  const s = Math.round(seconds);
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return d ? `${d} d ${h} h` : h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

// -- signing in and out ----------------------------------------------------

function showLogin(problem) {
  disconnect();
  $("main").hidden = true;
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = problem || "";
  $("token").value = "";
  $("token").focus();
}

function refusal(error) {
  if (/missing/.test(error.message)) return "Enter the device's API token.";
  return "This device did not accept that token. Check the token file the device's " +
    "config names in api.token_file and try again.";
}

async function connect() {
  let status;
  try {
    status = await api("/v1/status");
  } catch (error) {
    if (error instanceof AuthError) {
      sessionStorage.removeItem(TOKEN_KEY);
      token = null;
      showLogin(refusal(error));
    } else {
      showLogin(`The device did not answer: ${error.message}`);
    }
    return;
  }
  connected = true;
  $("login").hidden = true;
  $("main").hidden = false;
  $("sign-out").hidden = false;
  showStatus(status);
  poll(refreshStatus, POLL_MS.status);
  poll(refreshSegments, POLL_MS.segments, true);
  poll(refreshTranscripts, POLL_MS.transcripts, true);
  poll(refreshRecordings, POLL_MS.recordings, true);
  openLevels();
}

function disconnect() {
  connected = false;
  timers.forEach(clearInterval);
  timers = [];
  if (levels) levels.close();
  levels = null;
  stopListening();
}

// Every refresh shares one error path: a refused token sends the person back to
// the sign-in form with the reason; anything else shows on the card concerned.
function poll(fn, ms, now = false) {
  const run = async () => {
    if (!connected) return;
    try {
      await fn();
    } catch (error) {
      if (error instanceof AuthError) {
        sessionStorage.removeItem(TOKEN_KEY);
        showLogin("The device no longer accepts this token (it may have been changed). " +
          "Enter the current one.");
      } else {
        $("overall").textContent = "unreachable";
        $("overall").className = "badge down";
      }
    }
  };
  if (now) run();
  timers.push(setInterval(run, ms));
}

// -- health and facts ------------------------------------------------------

async function refreshStatus() {
  showStatus(await api("/v1/status"));
}

function showStatus(s) {
  deviceTime = Date.parse(s.time);
  $("device-name").textContent = s.device;
  document.title = `${s.device} · edge-agent`;
  $("overall").textContent = s.status;
  $("overall").className = `badge ${s.status}`;
  const components = $("components");
  components.replaceChildren();
  for (const [name, c] of Object.entries(s.components)) {
    const li = text(components, "li", "");
    text(li, "span", c.status, `state ${c.status}`);
    text(li, "span", name, "name");
    text(li, "span", c.detail, "detail");
  }
  const tasks = $("tasks");
  tasks.replaceChildren();
  for (const [name, t] of Object.entries(s.tasks || {})) {
    const li = text(tasks, "li", "");
    text(li, "span", t.state, `state ${t.state === "running" ? "ok" : t.state}`);
    text(li, "span", name, "name");
    const detail = `${t.starts} start(s), ${t.failures} failure(s)` +
      (t.last_error ? ` · last error: ${t.last_error}` : "");
    text(li, "span", detail, "detail");
  }
  const spool = s.spool || {};
  const facts = [
    ["Device id", s.device],
    ["Version", s.version],
    ["Uptime", duration(s.uptime_seconds)],
    ["Device time", clock(s.time)],
    ["Clock", s.clock_synced ? "synchronised" : "NOT synchronised (times may be off)"],
    ["Disk free", s.disk && s.disk.free_bytes != null ? mb(s.disk.free_bytes) : "unknown"],
    ["Upload backlog", spool.pending_segments != null
      ? `${spool.pending_segments} segment(s), ${mb(spool.pending_bytes)}` : "segments off"],
    ["In memory", `${duration(s.ring.held_seconds)} of ${duration(s.ring.capacity_seconds)}`],
    ["Input", `${s.config.capture.source} ${s.config.capture.device}, ` +
      `${s.config.capture.rate} Hz, ${s.config.capture.channels} ch`],
    ["Transcription", s.config.stt.enabled ? s.config.stt.url : "off"],
    ["Upload", s.config.upload.enabled ? s.config.upload.url : "off"],
  ];
  const dl = $("facts");
  dl.replaceChildren();
  for (const [term, value] of facts) {
    text(dl, "dt", term);
    text(dl, "dd", String(value));
  }
  view.ring = s.ring;
}

// -- the level meter -------------------------------------------------------

const percent = (db) => `${Math.max(0, Math.min(100, ((db - DB_FLOOR) / -DB_FLOOR) * 100))}%`;

async function openLevels() {
  if (!connected) return;
  let url;
  try {
    url = await signed("/v1/levels");
  } catch (error) {
    $("level-error").textContent = `Levels unavailable: ${error.message}`;
    setTimeout(openLevels, 5000);
    return;
  }
  const source = new EventSource(url);
  levels = source;
  source.onmessage = (event) => {
    $("level-error").textContent = "";
    const lv = JSON.parse(event.data);
    $("rms").value = lv.rms_dbfs.toFixed(1);
    $("peak").value = lv.peak_dbfs.toFixed(1);
    $("rms-bar").style.width = percent(lv.rms_dbfs);
    $("peak-mark").style.left = percent(lv.peak_dbfs);
    $("clip").hidden = !lv.clipped;
    $("overflow").hidden = !lv.overflow;
  };
  source.onerror = () => {
    // The stream ended or the device went away: a new signed URL, then again.
    source.close();
    if (levels === source && connected) {
      levels = null;
      setTimeout(openLevels, 1000);
    }
  };
}

// -- listening live --------------------------------------------------------

async function toggleListening() {
  const audio = $("live");
  if (!audio.paused) {
    stopListening();
    return;
  }
  $("listen-state").textContent = "connecting…";
  try {
    audio.src = await signed("/v1/live?seconds=3600");
    await audio.play();
    $("listen").textContent = "Stop";
    $("listen-state").textContent = "playing the microphone, a second or two behind";
  } catch (error) {
    $("listen-state").textContent = `Cannot play: ${error.message}`;
  }
}

function stopListening() {
  const audio = $("live");
  audio.pause();
  audio.removeAttribute("src");
  audio.load();
  $("listen").textContent = "Listen live";
  $("listen-state").textContent = "";
}

// -- the timeline ----------------------------------------------------------

function place(el, fromMs, toMs) {
  const span = view.to - view.from;
  const left = ((fromMs - view.from) / span) * 100;
  const width = ((toMs - fromMs) / span) * 100;
  el.style.left = `${Math.max(0, left)}%`;
  if (toMs !== undefined) el.style.width = `${Math.max(0.2, width)}%`;
}

async function refreshSegments() {
  const answer = await api("/v1/segments?limit=1000");
  drawTimeline(answer.segments);
}

function drawTimeline(segments) {
  const ring = view.ring || {};
  const ends = segments.map((s) => s.end_ts * 1000);
  const starts = segments.map((s) => s.start_ts * 1000);
  if (ring.oldest_utc) starts.push(Date.parse(ring.oldest_utc));
  if (ring.newest_utc) ends.push(Date.parse(ring.newest_utc));
  if (!starts.length) return;
  view.from = Math.min(...starts);
  view.to = Math.max(...ends, view.from + 1000);
  const box = $("timeline");
  const selection = box.querySelector(".selection");
  box.replaceChildren();
  if (ring.oldest_utc && ring.newest_utc) {
    const band = document.createElement("div");
    band.className = "ring";
    band.title = `in memory: ${clock(ring.oldest_utc)} – ${clock(ring.newest_utc)}`;
    place(band, Date.parse(ring.oldest_utc), Date.parse(ring.newest_utc));
    box.appendChild(band);
  }
  for (const s of segments) {
    const el = document.createElement("div");
    el.className = `seg ${s.state}`;
    el.dataset.start = s.start_utc;
    el.dataset.end = s.end_utc;
    el.title = `${s.state} segment ${clock(s.start_utc)} – ${clock(s.end_utc)}`;
    place(el, s.start_ts * 1000, s.end_ts * 1000);
    box.appendChild(el);
    for (const g of s.gaps || []) {
      const mark = document.createElement("div");
      mark.className = "gap";
      mark.title = `gap of ${g.seconds.toFixed(2)} s at ${clock(g.utc)} (${g.reason})`;
      place(mark, Date.parse(g.utc));
      box.appendChild(mark);
    }
    for (const c of s.clock_steps || []) {
      const mark = document.createElement("div");
      mark.className = "step";
      mark.title = `clock stepped by ${c.seconds.toFixed(2)} s`;
      place(mark, s.start_ts * 1000 + (c.frame / s.rate) * 1000);
      box.appendChild(mark);
    }
  }
  if (selection) box.appendChild(selection);
  $("axis-start").textContent = clock(iso(view.from));
  $("axis-end").textContent = clock(iso(view.to));
}

function timeAt(clientX) {
  const rect = $("timeline").getBoundingClientRect();
  const x = Math.max(0, Math.min(1, (clientX - rect.left) / rect.width));
  return view.from + x * (view.to - view.from);
}

function select(fromMs, toMs) {
  const [a, b] = fromMs <= toMs ? [fromMs, toMs] : [toMs, fromMs];
  $("range-start").value = iso(a);
  $("range-end").value = iso(b);
  let mark = $("timeline").querySelector(".selection");
  if (!mark) {
    mark = document.createElement("div");
    mark.className = "selection";
    $("timeline").appendChild(mark);
  }
  place(mark, a, b);
}

function watchTimeline() {
  const box = $("timeline");
  let anchor = null;
  box.addEventListener("pointerdown", (event) => {
    anchor = { x: event.clientX, t: timeAt(event.clientX), target: event.target };
    box.setPointerCapture(event.pointerId);
  });
  box.addEventListener("pointermove", (event) => {
    if (anchor && Math.abs(event.clientX - anchor.x) > 3) select(anchor.t, timeAt(event.clientX));
  });
  box.addEventListener("pointerup", (event) => {
    if (!anchor) return;
    if (Math.abs(event.clientX - anchor.x) <= 3 && anchor.target.dataset.start) {
      // A tap on a segment chooses the whole segment.
      select(Date.parse(anchor.target.dataset.start), Date.parse(anchor.target.dataset.end));
    } else if (Math.abs(event.clientX - anchor.x) > 3) {
      select(anchor.t, timeAt(event.clientX));
    }
    anchor = null;
  });
}

function rangeQuery() {
  const start = $("range-start").value.trim();
  const end = $("range-end").value.trim();
  if (!start || !end) throw new Error("choose a stretch on the timeline first");
  if (!(Date.parse(end) > Date.parse(start))) throw new Error("the end must come after the start");
  const format = $("range-format").value;
  const q = new URLSearchParams({ start, end, format });
  const extension = { opus: "opus", wav: "wav", flac: "oga" }[format];
  return { path: `/v1/audio?${q}`, name: `${start.replace(/[:.]/g, "-")}.${extension}` };
}

// The device says why a stretch cannot be had (too long, no audio held there):
// ask with the header first, so the message is the device's, not the player's.
async function checkedRange() {
  const range = rangeQuery();
  const head = await fetch(range.path, { method: "HEAD", headers: { Authorization: `Bearer ${token}` } });
  if (head.status === 401) throw new AuthError(await errorText(head));
  if (!head.ok) {
    const answer = await fetch(range.path, { headers: { Authorization: `Bearer ${token}` } });
    throw new Error(await errorText(answer));
  }
  return range;
}

async function playRange(event) {
  event.preventDefault();
  $("range-error").textContent = "";
  try {
    const range = await checkedRange();
    const audio = $("range-audio");
    audio.hidden = false;
    audio.src = await signed(range.path);
    $("download").hidden = false;
    await audio.play();
  } catch (error) {
    $("range-error").textContent = error.message;
  }
}

async function download(event) {
  event.preventDefault();
  $("range-error").textContent = "";
  try {
    const range = await checkedRange();
    const link = document.createElement("a");
    link.href = await signed(range.path);
    link.download = range.name;
    document.body.appendChild(link);
    link.click();
    link.remove();
  } catch (error) {
    $("range-error").textContent = error.message;
  }
}

// -- transcripts and recordings ---------------------------------------------

async function refreshTranscripts() {
  const since = iso((deviceTime || Date.now()) - 3600 * 1000);
  const answer = await api(`/v1/transcripts?since=${encodeURIComponent(since)}&limit=1000`);
  const list = $("transcripts");
  list.replaceChildren();
  const latest = answer.transcripts.slice(-20).reverse();
  if (!latest.length) text(list, "li", "No speech transcribed in the last hour.", "detail");
  for (const t of latest) {
    const li = text(list, "li", "");
    text(li, "time", clock(t.start_utc)).dateTime = t.start_utc;
    text(li, "span", t.text || "(no words)");
  }
}

async function refreshRecordings() {
  let answer;
  try {
    answer = await api("/v1/recordings");
  } catch (error) {
    if (error instanceof AuthError) throw error;
    $("rec-error").textContent = error.message;
    return;
  }
  const list = $("recordings");
  list.replaceChildren();
  for (const r of answer.slice(0, 10)) {
    const li = text(list, "li", "");
    text(li, "span", r.state, `state ${r.state === "recording" ? "ok" : ""}`);
    text(li, "span", r.key, "name");
    text(li, "span", `${clock(r.start_utc)} · ${r.seconds.toFixed(1)} s`, "detail");
    if (r.state === "recording") {
      const stop = text(li, "button", "Stop");
      stop.type = "button";
      stop.addEventListener("click", () => stopRecording(r.key));
    }
  }
}

async function startRecording(event) {
  event.preventDefault();
  $("rec-error").textContent = "";
  const name = $("rec-name").value.trim();
  const query = name ? `?prefix=${encodeURIComponent(name)}` : "";
  try {
    await api(`/v1/recordings${query}`, "POST");
    await refreshRecordings();
  } catch (error) {
    $("rec-error").textContent = error.message;
  }
}

async function stopRecording(key) {
  $("rec-error").textContent = "";
  try {
    const path = key.split("/").map(encodeURIComponent).join("/");
    await api(`/v1/recordings/${path}/stop`, "POST");
    await refreshRecordings();
  } catch (error) {
    $("rec-error").textContent = error.message;
  }
}

// -- start -------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    connect();
  });
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    token = null;
    showLogin("");
  });
  $("listen").addEventListener("click", toggleListening);
  $("range-form").addEventListener("submit", playRange);
  $("download").addEventListener("click", download);
  $("rec-form").addEventListener("submit", startRecording);
  watchTimeline();
  if (token) connect();
  else showLogin("");
});
