// The demo page's logic: a thin layer over NotifydClient and the dev-only endpoints.
import { NotifydClient } from "/client/notifyd.js";

const $ = (id) => document.getElementById(id);
const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);
let client = null;
let received = 0;
let trackTimer = null;
let positions = 0;
let walk = { lat: 48.8566, lng: 2.3522 };

$("user").value = `demo-${Math.random().toString(36).slice(2, 7)}`;

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
  client = new NotifydClient({ getToken: mintToken, backoff: { min: 300, max: 5000 } });
  window.notifydClient = client; // for the browser tests and the curious
  client.on("notification", showNotification);
  client.on("state", (s) => {
    $("state").textContent = s.state + (s.resumed === true ? " (resumed)" : "");
    $("state").className = `badge ${s.state}`;
    $("reconnects").textContent = client.reconnects;
    if (s.state === "reconnecting") log(`reconnecting in ${s.delay} ms (close ${s.code ?? "-"})`);
    if (s.state === "open") log(`connected, session ${s.session}${s.resumed === false ? ", gap too old to resume" : ""}`);
  });
  client.on("error", (e) => log(`error ${e.code}: ${e.message}`));
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
