// The demo page's logic: a thin layer over NotifydClient and the dev-only endpoints.
import { NotifydClient } from "/client/notifyd.js";

const $ = (id) => document.getElementById(id);
const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);
let client = null;
let received = 0;
let trackTimer = null;
let positions = 0;
let walk = { lat: 48.8566, lng: 2.3522 };
/** Users whose presence the current client watches (its token's `presence` claim). */
let watched = [];

$("user").value = `demo-${Math.random().toString(36).slice(2, 7)}`;

// Demo users this browser connected as lately (other tabs too): watched by default.
const KNOWN = "notifyd-demo-users";
function knownUsers() {
  try {
    return JSON.parse(localStorage.getItem(KNOWN) || "[]").filter((u) => typeof u === "string");
  } catch {
    return [];
  }
}
function remember(user) {
  try {
    localStorage.setItem(KNOWN, JSON.stringify([user, ...knownUsers().filter((u) => u !== user)].slice(0, 5)));
  } catch {
    // storage unavailable: nothing to prefill next time
  }
}
$("watch").value = knownUsers().join(", ");

// ?transport=sse forces SSE (websocket: no fallback); ?share=1 shares one connection per user across tabs.
const params = new URLSearchParams(location.search);
if (["auto", "websocket", "sse"].includes(params.get("transport"))) $("transport-option").value = params.get("transport");
$("share").checked = params.get("share") === "1";

function log(text) {
  const line = document.createElement("div");
  line.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  $("log").prepend(line);
}

async function mintToken() {
  const response = await fetch("/demo/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      user: $("user").value.trim(),
      topics: list($("topics").value),
      publish: list($("publish-topics").value),
      presence: watched,
      ttl: 300,
    }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.message || response.statusText);
  return body.token;
}

function showNotification(n) {
  received += 1;
  $("received").textContent = received;
  const feed = $("feed");
  feed.querySelector(".empty")?.remove();
  const item = document.createElement("li");
  item.dataset.id = n.id;
  const meta = document.createElement("div");
  meta.className = "meta";
  const channel = document.createElement("span");
  channel.className = "chan";
  channel.textContent = n.channel;
  meta.append(channel);
  if (n.event) {
    const event = document.createElement("span");
    event.className = "event";
    event.textContent = n.event;
    meta.append(event);
  }
  const when = document.createElement("span");
  when.textContent = new Date(n.ts).toLocaleTimeString() + (n.from ? ` · from ${n.from}` : "");
  meta.append(when);
  const data = document.createElement("pre");
  data.textContent = JSON.stringify(n.data, null, 2);
  item.append(meta, data);
  feed.prepend(item);
  while (feed.children.length > 200) feed.lastChild.remove();
  if (n.channel === "topic:lobby") showChat(n);
  if (n.channel.startsWith("presence:") && n.event === "presence") {
    showPresence(n.channel.slice("presence:".length), n.data?.online === true, "live");
  }
}

// --- presence ---------------------------------------------------------------------

/** Users whose badge a live transition set: the initial query must not overwrite it. */
let live = new Set();

function showPresence(user, online, source) {
  if (source === "live") live.add(user);
  else if (live.has(user)) return;
  const badge = $("presence").querySelector(`li[data-user="${CSS.escape(user)}"] .badge`);
  if (!badge) return;
  badge.textContent = online ? "online" : "offline";
  badge.className = `badge ${online ? "online" : "offline"}`;
}

function listWatched() {
  const ul = $("presence");
  ul.replaceChildren();
  live = new Set();
  if (!watched.length) {
    const hint = document.createElement("li");
    hint.className = "hint";
    hint.textContent = "Nobody watched: name users above, then connect.";
    ul.append(hint);
  }
  for (const user of watched) {
    const item = document.createElement("li");
    item.dataset.user = user;
    const name = document.createElement("span");
    name.textContent = user;
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "unknown";
    item.append(name, badge);
    ul.append(item);
  }
}

/** Subscribe to each watched user's transitions, then ask who is online now. */
async function watchPresence(c) {
  const results = await Promise.allSettled(watched.map((u) => c.subscribe(`presence:${u}`)));
  results.forEach((r, i) => r.status === "rejected" && log(`cannot watch ${watched[i]}: ${r.reason.message}`));
  if (!watched.length) return;
  const query = watched.map((u) => `user=${encodeURIComponent(u)}`).join("&");
  const response = await fetch(`/demo/presence?${query}`);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    log(`presence query failed: ${body.message || response.status}`);
    return;
  }
  for (const [user, state] of Object.entries(body.users || {})) showPresence(user, state.online === true, "query");
}

function showChat(n) {
  const line = document.createElement("div");
  const from = document.createElement("span");
  from.className = "from";
  from.textContent = `${n.from || "backend"}: `;
  line.append(from, document.createTextNode(n.data?.text ?? JSON.stringify(n.data)));
  $("chat-log").append(line);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
}

$("connect").onclick = () => {
  if (client) client.close();
  const me = $("user").value.trim();
  watched = [...new Set(list($("watch").value))].filter((u) => u !== me);
  listWatched();
  remember(me);
  const current = new NotifydClient({
    getToken: mintToken,
    backoff: { min: 300, max: 5000 },
    transport: $("transport-option").value,
    // Keyed by user: the demo's tabs may be different users; each group shares one connection.
    shareAcrossTabs: $("share").checked ? `demo:${me}` : false,
  });
  client = current;
  window.notifydClient = client; // for the browser tests and the curious
  client.on("notification", showNotification);
  // The first welcome subscribes; the client resubscribes by itself after a reconnect.
  const stop = client.on("welcome", () => {
    stop();
    watchPresence(current).catch((err) => log(`presence: ${err.message}`));
  });
  client.on("state", (s) => {
    $("state").textContent = s.state + (s.resumed === true ? " (resumed)" : "");
    $("state").className = `badge ${s.state}`;
    $("reconnects").textContent = client.reconnects;
    $("transport").textContent = s.transport + (s.fallback ? " (fallback)" : "");
    $("transport").className = `badge ${s.transport}`;
    $("role").hidden = !s.role;
    $("role").textContent = s.role || "";
    if (s.state === "reconnecting") log(`reconnecting in ${s.delay} ms (close ${s.code ?? "-"})`);
    if (s.state === "open") log(`connected, session ${s.session}${s.resumed === false ? ", gap too old to resume" : ""}`);
  });
  client.on("error", (e) => log(`error ${e.code}: ${e.message}`));
  client.on("transport", (t) => log(t.fallback ? "the WebSocket cannot open here: falling back to SSE" : `trying ${t.transport} again`));
  client.connect();
  $("who").textContent = $("user").value;
  $("disconnect").disabled = false;
};

$("disconnect").onclick = () => {
  client?.close();
  $("disconnect").disabled = true;
};

$("send-http").onclick = async () => {
  let data;
  try {
    data = JSON.parse($("data").value);
  } catch {
    log("data is not valid JSON");
    return;
  }
  const target = $("target").value;
  const channel = target === "me" ? `user:${$("user").value.trim()}` : target;
  const response = await fetch("/demo/publish", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ channel, event: $("event").value || undefined, data }),
  });
  const body = await response.json();
  log(response.ok ? `published ${body.id} to ${channel}` : `publish failed: ${body.message}`);
};

async function sendChat() {
  const text = $("chat-text").value.trim();
  if (!text || !client) return;
  try {
    await client.publish("topic:lobby", { text }, "chat");
    $("chat-text").value = "";
  } catch (err) {
    log(`chat refused: ${err.message}`);
  }
}
$("chat-send").onclick = sendChat;
$("chat-text").onkeydown = (e) => e.key === "Enter" && sendChat();

function nextPosition() {
  return new Promise((resolve) => {
    const simulated = () => {
      walk = { lat: walk.lat + (Math.random() - 0.5) / 500, lng: walk.lng + (Math.random() - 0.5) / 500 };
      resolve({ ...walk, simulated: true });
    };
    if (!navigator.geolocation) return simulated();
    navigator.geolocation.getCurrentPosition(
      (p) => resolve({ lat: p.coords.latitude, lng: p.coords.longitude, accuracy: p.coords.accuracy }),
      simulated,
      { timeout: 1000 },
    );
  });
}

async function track() {
  if (!client) return;
  const position = await nextPosition();
  try {
    await client.send("position", position);
    positions += 1;
    $("positions").textContent = positions;
    $("last-position").textContent = `${position.lat.toFixed(4)}, ${position.lng.toFixed(4)}`;
  } catch (err) {
    log(`position not sent: ${err.message}`);
  }
}

$("tracking").onchange = (e) => {
  clearInterval(trackTimer);
  trackTimer = null;
  if (e.target.checked) {
    track();
    trackTimer = setInterval(track, 3000);
  }
};

// --- offline -> push --------------------------------------------------------------

const PUSH_TIMEOUT = 20000;

function pushState(text, kind = "") {
  $("push-state").textContent = text;
  $("push-state").className = `hint ${kind}`;
}

/** Why Web Push cannot work here, or null when it may (the server and the browser). */
async function pushUnavailable() {
  if (!navigator.serviceWorker || !("PushManager" in window)) {
    return window.isSecureContext
      ? "not available: this browser has no Push API"
      : "not available: the Push API needs a secure context (https or localhost)";
  }
  const response = await fetch("/api/push/vapid-public-key").catch(() => null);
  if (!response?.ok) {
    return "not available: the server has no VAPID key ([webpush] vapid_private_key; `make run` sets one)";
  }
  if (window.Notification?.permission === "denied") {
    return "not available: notification permission denied for this site";
  }
  return null;
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(Object.assign(new Error(what), { code: "timeout" })), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function pushError(err) {
  if (err.code === "unsupported") return "not available: this browser has no Push API";
  if (err.code === "push_disabled") return "not available: the server has no VAPID key ([webpush] vapid_private_key)";
  if (err.code === "timeout") return `not available: ${err.message}`;
  if (err.name === "NotAllowedError" || window.Notification?.permission === "denied") {
    return `not available: permission denied (${err.message})`;
  }
  if (err.name === "AbortError") return `not available: the browser's push service refused (${err.message})`;
  return `failed: ${err.name && err.name !== "Error" ? `${err.name}: ` : ""}${err.message}`;
}

$("push").onchange = async (e) => {
  const box = e.target;
  box.disabled = true;
  try {
    if (!client) {
      box.checked = false;
      pushState("connect first: push is registered for the connected user", "unavailable");
      return;
    }
    if (box.checked) {
      const reason = await pushUnavailable();
      if (reason) throw Object.assign(new Error(reason), { code: "explained" });
      pushState("enabling… (the browser may ask for permission)");
      const user = $("who").textContent;
      await withTimeout(client.enablePush("/notifyd-sw.js"), PUSH_TIMEOUT, `no answer from the browser's push service in ${PUSH_TIMEOUT / 1000} s`);
      pushState(`enabled: notifications for ${user} reach this browser while no tab is open (with notifyd webpush running)`, "enabled");
    } else {
      const removed = await withTimeout(client.disablePush(), PUSH_TIMEOUT, "no answer while unsubscribing");
      pushState(removed ? "off: this browser's subscription is removed" : "off", "");
    }
  } catch (err) {
    box.checked = false;
    const text = err.code === "explained" ? err.message : pushError(err);
    pushState(text, "unavailable");
    log(`push: ${text}`);
  } finally {
    box.disabled = false;
  }
};

pushUnavailable().then(
  (reason) => pushState(reason || "off: tick the box (after connecting) to enable", reason ? "unavailable" : ""),
  (err) => pushState(`cannot tell: ${err.message}`, "unavailable"),
);
