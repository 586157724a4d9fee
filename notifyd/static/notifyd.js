// notifyd browser client: an ES module, no build step, no dependencies.
//
//   import { NotifydClient } from "/client/notifyd.js";
//   const client = new NotifydClient({ getToken: () => fetch("/token").then(r => r.text()) });
//   client.on("notification", (n) => console.log(n.channel, n.event, n.data));
//   client.connect();
//
// It authenticates with the first message, answers refresh_required with a fresh
// token, reconnects with full-jitter exponential backoff, resumes from the last id
// it saw (so a reconnect loses nothing) and drops duplicates by id.

/** Close codes after which reconnecting with the same token is pointless. */
const FATAL = new Set([1009, 4000, 4003]);
/** Close codes that call for a new token before reconnecting. */
const NEEDS_TOKEN = new Set([4001, 4010]);

/**
 * @typedef {{id: string, channel: string, event?: string, data: any, ts: number, from?: string}} Notification
 * @typedef {"idle"|"connecting"|"open"|"reconnecting"|"closed"} State
 * @typedef {{
 *   url?: string,
 *   getToken: () => string | Promise<string>,
 *   topics?: string[],
 *   backoff?: {min?: number, max?: number},
 *   dedupeSize?: number,
 *   requestTimeout?: number,
 *   WebSocketImpl?: typeof WebSocket,
 * }} Options
 */

/** Full-jitter exponential backoff: a random delay in [0, min(max, min * 2^attempt)]. */
export function backoffDelay(attempt, min = 500, max = 30000, random = Math.random) {
  const ceiling = Math.min(max, min * 2 ** attempt);
  return Math.max(min / 2, Math.floor(random() * ceiling));
}

/** A bounded set that forgets its oldest entries first. */
export class RecentIds {
  /** @param {number} size */
  constructor(size = 1000) {
    this.size = size;
    /** @type {Set<string>} */
    this.ids = new Set();
  }
  /** True if `id` was seen already; remembers it otherwise. */
  seen(id) {
    if (this.ids.has(id)) return true;
    this.ids.add(id);
    if (this.ids.size > this.size) this.ids.delete(this.ids.values().next().value);
    return false;
  }
}

function defaultUrl() {
  const { protocol, host } = globalThis.location;
  return `${protocol === "https:" ? "wss:" : "ws:"}//${host}/ws`;
}

export class NotifydClient {
  /** @param {Options} options */
  constructor(options) {
    if (!options || typeof options.getToken !== "function") {
      throw new TypeError("NotifydClient needs a getToken() function");
    }
    this.url = options.url || defaultUrl();
    this.getToken = options.getToken;
    this.topics = new Set((options.topics || []).map((t) => (t.startsWith("topic:") ? t : `topic:${t}`)));
    this.backoff = { min: 500, max: 30000, ...(options.backoff || {}) };
    this.requestTimeout = options.requestTimeout ?? 10000;
    this.WebSocketImpl = options.WebSocketImpl || globalThis.WebSocket;
    this.recent = new RecentIds(options.dedupeSize ?? 1000);
    /** @type {State} */
    this.state = "idle";
    /** Last notification seen: the resume point after a reconnect. */
    this.lastId = null;
    this.lastTs = null;
    this.attempt = 0;
    this.reconnects = 0;
    this.session = null;
    /** @type {WebSocket | null} */
    this.ws = null;
    this.closedByUser = false;
    this.nextRef = 1;
    /** @type {Map<string|number, {resolve: Function, reject: Function, timer: any}>} */
    this.pending = new Map();
    /** @type {Map<string, Set<Function>>} */
    this.listeners = new Map();
    this.timer = null;
  }

  /** Listen to "notification", "state", "welcome", "error" or "message". */
  on(event, fn) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this.listeners.get(event)?.delete(fn);
  }

  emit(event, value) {
    for (const fn of this.listeners.get(event) || []) {
      try {
        fn(value);
      } catch (err) {
        console.error("notifyd listener failed", err);
      }
    }
  }

  setState(state, info = {}) {
    this.state = state;
    this.emit("state", { state, ...info });
  }

  /** Open the socket (and keep it open until close()). */
  connect() {
    this.closedByUser = false;
    if (this.ws || this.timer) return;
    this.open();
  }

  async open() {
    this.setState(this.attempt ? "reconnecting" : "connecting", { attempt: this.attempt });
    let token;
    try {
      token = await this.getToken();
    } catch (err) {
      this.emit("error", { code: "token_unavailable", message: String(err) });
      this.scheduleReconnect();
      return;
    }
    if (this.closedByUser) return;
    const ws = new this.WebSocketImpl(this.url, "notifyd.v1");
    this.ws = ws;
    ws.onopen = () => {
      const auth = { type: "auth", token };
      if (this.lastId) {
        auth.since = this.lastId;
        if (this.lastTs != null) auth.since_ts = this.lastTs;
      }
      ws.send(JSON.stringify(auth));
    };
    ws.onmessage = (event) => this.receive(event.data);
    ws.onclose = (event) => this.closed(ws, event.code, event.reason);
    ws.onerror = () => {}; // onclose follows with the code
  }

  receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    this.emit("message", message);
    switch (message.type) {
      case "welcome":
        this.attempt = 0;
        this.session = message.session;
        this.setState("open", { resumed: message.resumed, session: message.session });
        this.emit("welcome", message);
        for (const channel of this.topics) this.request({ type: "subscribe", channel }).catch(() => {});
        break;
      case "notification":
        this.lastId = message.id;
        this.lastTs = message.ts;
        if (!this.recent.seen(message.id)) this.emit("notification", message);
        break;
      case "refresh_required":
        this.refresh();
        break;
      case "error":
        if (!this.settle(message.ref, null, message)) this.emit("error", message);
        break;
      default:
        if (message.ref !== undefined) this.settle(message.ref, message, null);
    }
  }

  async refresh() {
    try {
      const token = await this.getToken();
      this.ws?.send(JSON.stringify({ type: "refresh", token }));
    } catch (err) {
      this.emit("error", { code: "token_unavailable", message: String(err) });
    }
  }

  closed(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    for (const [ref, waiter] of this.pending) {
      clearTimeout(waiter.timer);
      waiter.reject(Object.assign(new Error("connection closed"), { code: "closed" }));
      this.pending.delete(ref);
    }
    if (this.closedByUser) {
      this.setState("closed", { code, reason });
      return;
    }
    if (FATAL.has(code)) {
      this.emit("error", { code: `closed_${code}`, message: reason || "closed by the server" });
      this.setState("closed", { code, reason });
      return;
    }
    if (NEEDS_TOKEN.has(code)) this.emit("error", { code: `closed_${code}`, message: reason });
    this.scheduleReconnect(code, reason);
  }

  scheduleReconnect(code, reason) {
    // 1001 (server draining) is expected: reconnect soon, still with jitter.
    const delay =
      code === 1001 && this.attempt === 0
        ? Math.floor(Math.random() * this.backoff.min)
        : backoffDelay(this.attempt, this.backoff.min, this.backoff.max);
    this.attempt += 1;
    this.reconnects += 1;
    this.setState("reconnecting", { attempt: this.attempt, delay, code, reason });
    this.timer = setTimeout(() => {
      this.timer = null;
      if (!this.closedByUser) this.open();
    }, delay);
  }

  /** Close for good (no reconnect). */
  close() {
    this.closedByUser = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.ws) this.ws.close(1000, "client closed");
    else this.setState("closed", { code: 1000 });
  }

  request(message) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== 1) {
        reject(Object.assign(new Error("not connected"), { code: "not_connected" }));
        return;
      }
      const ref = this.nextRef++;
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(Object.assign(new Error("no answer"), { code: "timeout" }));
      }, this.requestTimeout);
      this.pending.set(ref, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ ...message, ref }));
    });
  }

  settle(ref, answer, error) {
    const waiter = ref === undefined ? undefined : this.pending.get(ref);
    if (!waiter) return false;
    clearTimeout(waiter.timer);
    this.pending.delete(ref);
    if (error) waiter.reject(Object.assign(new Error(error.message), error));
    else waiter.resolve(answer);
    return true;
  }

  /** Join a topic the token allows; kept across reconnects. */
  subscribe(channel) {
    this.topics.add(channel);
    return this.request({ type: "subscribe", channel });
  }

  unsubscribe(channel) {
    this.topics.delete(channel);
    return this.request({ type: "unsubscribe", channel });
  }

  /** Publish to everyone on a topic (needs the token's publish claim). */
  publish(channel, data, event) {
    const message = { type: "publish", channel, data };
    if (event) message.event = event;
    return this.request(message);
  }

  /** Send a message to the backends (exchange notifyd.upstream). */
  send(event, data) {
    return this.request({ type: "send", event, data });
  }

  ping() {
    return this.request({ type: "ping" });
  }

  /** The gateway's HTTP base URL (from the WebSocket URL: ws(s)://host/ws -> http(s)://host). */
  httpBase() {
    const url = new URL(this.url, globalThis.location?.href);
    url.protocol = url.protocol === "wss:" ? "https:" : url.protocol === "ws:" ? "http:" : url.protocol;
    url.pathname = url.pathname.replace(/\/ws\/?$/, "");
    url.search = "";
    url.hash = "";
    return url.href.replace(/\/$/, "");
  }

  /**
   * Web Push for when no tab is open: register the service worker at `swUrl` (on the
   * page's own origin, e.g. a copy of /notifyd-sw.js), subscribe with the gateway's
   * VAPID key and register the subscription for this user. Resolves to the
   * PushSubscription; rejects when the browser cannot or the user said no.
   * @param {string} swUrl
   * @param {{scope?: string}} [options]
   */
  async enablePush(swUrl, options = {}) {
    const nav = globalThis.navigator;
    if (!nav?.serviceWorker || !("PushManager" in globalThis)) {
      throw Object.assign(new Error("this browser has no Web Push"), { code: "unsupported" });
    }
    const base = this.httpBase();
    const response = await fetch(`${base}/api/push/vapid-public-key`);
    if (!response.ok) {
      throw Object.assign(new Error(`Web Push is not enabled on the server (${response.status})`), {
        code: "push_disabled",
      });
    }
    const { publicKey } = await response.json();
    if (globalThis.Notification?.permission === "default") {
      await globalThis.Notification.requestPermission();
    }
    const registration = await nav.serviceWorker.register(swUrl, options.scope ? { scope: options.scope } : undefined);
    await nav.serviceWorker.ready;
    let subscription = await registration.pushManager.getSubscription();
    const key = base64UrlToBytes(publicKey);
    if (subscription && !sameKey(subscription.options?.applicationServerKey, key)) {
      await subscription.unsubscribe(); // subscribed with another (older) VAPID key
      subscription = null;
    }
    if (!subscription) {
      subscription = await registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key });
    }
    await this.pushRequest("POST", subscription.toJSON());
    return subscription;
  }

  /** Stop Web Push on this browser: unregister the subscription here and at the gateway. */
  async disablePush() {
    const registration = await globalThis.navigator?.serviceWorker?.getRegistration();
    const subscription = await registration?.pushManager.getSubscription();
    if (!subscription) return false;
    await this.pushRequest("DELETE", { endpoint: subscription.endpoint });
    return subscription.unsubscribe();
  }

  /** An authenticated request to /api/push/subscriptions with the client's token. */
  async pushRequest(method, body) {
    const token = await this.getToken();
    const response = await fetch(`${this.httpBase()}/api/push/subscriptions`, {
      method,
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      throw Object.assign(new Error(answer.message || `HTTP ${response.status}`), {
        code: answer.error || "http_error",
        status: response.status,
      });
    }
    return answer;
  }
}

/** @param {string} text base64url without padding */
function base64UrlToBytes(text) {
  const base64 = (text + "=".repeat((4 - (text.length % 4)) % 4)).replace(/-/g, "+").replace(/_/g, "/");
  return Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
}

/** @param {ArrayBuffer | null | undefined} buffer @param {Uint8Array} key */
function sameKey(buffer, key) {
  if (!buffer) return true; // unknown: keep the subscription
  const bytes = new Uint8Array(buffer);
  return bytes.length === key.length && bytes.every((b, i) => b === key[i]);
}

export default NotifydClient;
