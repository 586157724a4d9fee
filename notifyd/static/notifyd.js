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
//
// Transports: a WebSocket (/ws) by default; Server-Sent Events (/sse, plus POST
// /api/messages for what the client sends) when asked to, or by itself when the
// WebSocket keeps failing before the server's welcome ("auto", see FALLBACK_AFTER).
// With shareAcrossTabs, the tabs of one origin elect a leader (Web Locks) that holds
// the only connection and relays it to the others over a BroadcastChannel.

/** Close codes after which reconnecting with the same token is pointless. */
const FATAL = new Set([1009, 4000, 4003]);
/** Close codes that call for a new token before reconnecting. */
const NEEDS_TOKEN = new Set([4001, 4010]);
/** The code a browser reports when a connection ended without a close frame: refused,
 * an upgrade a proxy answered with an HTTP error, a cut. notifyd's own closes carry one. */
const ABNORMAL = 1006;
/**
 * "auto" tries the WebSocket first. After this many WebSocket attempts in a row that
 * ended with ABNORMAL before the welcome while the gateway's HTTP answered (so it is
 * not simply down or restarting), it switches to SSE; after as many SSE attempts in a
 * row that failed before the welcome, back to the WebSocket. A welcome resets both.
 */
const FALLBACK_AFTER = 2;
/** SSE event types the client reads: every WebSocket message type plus `close`. */
const STREAM_EVENTS = [
  "welcome",
  "notification",
  "refresh_required",
  "refreshed",
  "error",
  "close",
  "subscribed",
  "unsubscribed",
  "pong",
];

/**
 * @typedef {{id: string, channel: string, event?: string, data: any, ts: number, from?: string}} Notification
 * @typedef {"idle"|"connecting"|"open"|"reconnecting"|"closed"} State
 * @typedef {"auto"|"websocket"|"sse"} TransportOption
 * @typedef {{
 *   url?: string,
 *   sseUrl?: string,
 *   getToken: () => string | Promise<string>,
 *   topics?: string[],
 *   transport?: TransportOption,
 *   shareAcrossTabs?: boolean | string,
 *   backoff?: {min?: number, max?: number},
 *   dedupeSize?: number,
 *   requestTimeout?: number,
 *   WebSocketImpl?: typeof WebSocket,
 *   EventSourceImpl?: typeof EventSource,
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

/** True when this browser can share one connection between tabs. */
export function canShareAcrossTabs() {
  return typeof globalThis.navigator?.locks?.request === "function" && typeof globalThis.BroadcastChannel === "function";
}

function failure(message, code, extra = {}) {
  return Object.assign(new Error(message), { code, ...extra });
}

/** An error as plain data, to cross a BroadcastChannel (its `message` is not enumerable). */
function errorData(err) {
  return { ...err, message: err?.message ?? String(err), code: err?.code ?? "error" };
}

export class NotifydClient {
  /** @param {Options} options */
  constructor(options) {
    if (!options || typeof options.getToken !== "function") {
      throw new TypeError("NotifydClient needs a getToken() function");
    }
    const transport = options.transport ?? "auto";
    if (!["auto", "websocket", "sse"].includes(transport)) {
      throw new TypeError(`transport must be "auto", "websocket" or "sse", not ${JSON.stringify(transport)}`);
    }
    this.url = options.url || defaultUrl();
    this.sseUrl = options.sseUrl || `${this.httpBase()}/sse`;
    this.getToken = options.getToken;
    this.topics = new Set((options.topics || []).map((t) => (/^(topic|presence):/.test(t) ? t : `topic:${t}`)));
    this.backoff = { min: 500, max: 30000, ...(options.backoff || {}) };
    this.requestTimeout = options.requestTimeout ?? 10000;
    this.WebSocketImpl = options.WebSocketImpl || globalThis.WebSocket;
    this.EventSourceImpl = options.EventSourceImpl || globalThis.EventSource;
    this.recent = new RecentIds(options.dedupeSize ?? 1000);
    /** What was asked for; `transport` is what is in use (or tried next). */
    this.transportOption = transport;
    /** @type {"websocket"|"sse"} */
    this.transport = transport === "sse" || (transport === "auto" && !this.WebSocketImpl) ? "sse" : "websocket";
    /** Attempts in a row on the current transport that failed before the welcome (see FALLBACK_AFTER). */
    this.failures = 0;
    /** Set while the transport in use is "auto"'s fallback choice (for the state events). */
    this.fallback = false;
    const share = options.shareAcrossTabs;
    /** The Web Lock and BroadcastChannel name shared by the tabs of one group, or null. */
    this.shareName = share ? `notifyd:${typeof share === "string" ? share : this.url}` : null;
    /** @type {"leader"|"follower"|null} null: not sharing (a connection of its own). */
    this.role = null;
    /** @type {State} */
    this.state = "idle";
    /** Last notification seen: the resume point after a reconnect. */
    this.lastId = null;
    this.lastTs = null;
    this.attempt = 0;
    this.reconnects = 0;
    this.session = null;
    /** @type {WebSocket | EventSource | null} the connection in use */
    this.conn = null;
    /** @type {EventSource | null} an SSE stream opened to replace `conn` (refresh, subscribe) */
    this.replacement = null;
    this.welcomed = false;
    /** The token of the connection in use (Authorization of POST /api/messages). */
    this.token = null;
    this.active = false;
    this.closedByUser = false;
    this.nextRef = 1;
    /** @type {Map<string|number, {resolve: Function, reject: Function, timer: any}>} */
    this.pending = new Map();
    /** @type {Map<string, Set<Function>>} */
    this.listeners = new Map();
    this.timer = null;
    /** SSE: channels subscribed while on SSE, by this tab or (as the leader) for others;
     * with `topics`, the stream URL's `subscribe` parameters. */
    this.relayedTopics = new Set();
    /** SSE: subscribe/refresh callers waiting for the next stream's welcome. */
    this.reopenWaiters = [];
    /** SSE: the callers the replacement stream's welcome answers. */
    this.replacementWaiters = [];
    this.reopening = false;
    /** SSE: the close of a stream whose replacement was on the way (see streamClosed). */
    this.orphan = null;
    /** SSE: subscribe() callers waiting for the stream's answer, by channel. */
    this.channelWaiters = new Map();
    /** The last state and welcome events (a new tab gets the leader's). */
    this.lastState = null;
    this.lastWelcome = null;
    /** Sharing: this tab's id, the group's channel, requests forwarded to the leader. */
    this.tabId = null;
    /** @type {BroadcastChannel | null} */
    this.channel = null;
    /** @type {Map<number, {resolve: Function, reject: Function, timer: any}>} */
    this.forwarded = new Map();
    this.lockAbort = null;
    this.releaseLock = null;
  }

  /** The WebSocket in use, if the transport is one. */
  get ws() {
    return this.transport === "websocket" ? this.conn : null;
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
    const event = { state, transport: this.transport, ...info };
    if (this.fallback) event.fallback = true;
    if (this.role) event.role = this.role;
    this.lastState = event;
    this.emit("state", event);
    if (this.role === "leader" && !this.closedByUser) this.relay({ kind: "state", event });
  }

  /** Open the connection (and keep it open until close()). */
  connect() {
    this.closedByUser = false;
    if (this.active) return;
    this.active = true;
    if (this.shareName && canShareAcrossTabs()) this.joinTabs();
    else this.open();
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
    this.token = token;
    this.welcomed = false;
    if (this.transport === "sse") this.openStream(token);
    else this.openWebSocket(token);
  }

  openWebSocket(token) {
    let ws;
    try {
      ws = new this.WebSocketImpl(this.url, "notifyd.v1");
    } catch (err) {
      // A URL the browser refuses, or a Content-Security-Policy: as good as a refused upgrade.
      this.emit("error", { code: "websocket_unavailable", message: String(err) });
      this.conn = null;
      this.failed(ABNORMAL, String(err));
      return;
    }
    this.conn = ws;
    ws.onopen = () => {
      const auth = { type: "auth", token };
      if (this.lastId) {
        auth.since = this.lastId;
        if (this.lastTs != null) auth.since_ts = this.lastTs;
      }
      ws.send(JSON.stringify(auth));
    };
    ws.onmessage = (event) => this.receive(event.data, ws);
    ws.onclose = (event) => this.closed(ws, event.code, event.reason);
    ws.onerror = () => {}; // onclose follows with the code
  }

  // --- SSE ------------------------------------------------------------------------

  /** A single-use ticket for GET /sse (EventSource cannot send an Authorization header). */
  async ticket(token) {
    const response = await fetch(`${this.httpBase()}/api/sse-ticket`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token}` },
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok || typeof body.ticket !== "string") {
      // The HTTP APIs' error shape: {"error": "<code>", "message": "..."}.
      throw failure(body.message || `HTTP ${response.status}`, body.error || "http_error", { status: response.status });
    }
    return body.ticket;
  }

  /** Channels an SSE stream subscribes at open: this tab's and those it holds for other tabs. */
  streamTopics() {
    return new Set([...this.topics, ...this.relayedTopics]);
  }

  streamUrl(ticket) {
    const url = new URL(this.sseUrl, globalThis.location?.href);
    url.searchParams.set("ticket", ticket);
    if (this.lastId) {
      url.searchParams.set("lastEventId", this.lastId);
      if (this.lastTs != null) url.searchParams.set("since_ts", String(this.lastTs));
    }
    for (const channel of this.streamTopics()) url.searchParams.append("subscribe", channel);
    return url.href;
  }

  /** A new EventSource reading into receive(); its own reconnect is never used (spent ticket). */
  newStream(ticket) {
    const es = new this.EventSourceImpl(this.streamUrl(ticket));
    es.channels = this.streamTopics(); // what this stream subscribed at open
    for (const type of STREAM_EVENTS) {
      es.addEventListener(type, (event) => {
        // A server "event: error" is a MessageEvent with data; a failed connection is not.
        if (event.data !== undefined) this.receive(event.data, es);
        else if (type === "error") this.streamFailed(es);
      });
    }
    return es;
  }

  async openStream(token) {
    let ticket;
    try {
      ticket = await this.ticket(token);
    } catch (err) {
      if (this.closedByUser) return;
      this.emit("error", { code: `sse_ticket_${err.status ?? "failed"}`, message: err.message });
      // The ticket endpoint speaks HTTP: map its refusals to the close codes' rules.
      this.failed(err.status === 401 ? 4001 : err.status === 403 ? 4003 : ABNORMAL, err.message);
      return;
    }
    if (this.closedByUser) return;
    this.conn = this.newStream(ticket);
  }

  streamFailed(es) {
    es.close();
    if (es === this.replacement) {
      this.replacementFailed(failure("the new stream failed", "closed"));
      return;
    }
    this.closed(es, ABNORMAL, "stream error");
  }

  /**
   * Open a second stream (fresh token and ticket, resuming from the last id, with the
   * current subscriptions) and close the first once the second is welcomed; the overlap
   * is deduplicated by id. Resolves at that welcome.
   */
  reopenStream() {
    return new Promise((resolve, reject) => {
      this.reopenWaiters.push({ resolve, reject });
      if (!this.reopening) this.startReopen();
    });
  }

  async startReopen() {
    this.reopening = true;
    try {
      const token = await this.getToken();
      const ticket = await this.ticket(token);
      if (this.closedByUser || this.transport !== "sse" || !this.conn) throw failure("not connected", "not_connected");
      this.token = token;
      // Waiters that arrive from here on need a URL built after them: the next round.
      this.replacementWaiters = this.reopenWaiters;
      this.reopenWaiters = [];
      this.replacement = this.newStream(ticket);
    } catch (err) {
      this.replacementFailed(err);
    }
  }

  replacementFailed(err) {
    const waiters = [...(this.replacementWaiters || []), ...this.reopenWaiters];
    this.replacement?.close();
    this.replacement = null;
    this.replacementWaiters = [];
    this.reopenWaiters = [];
    this.reopening = false;
    for (const waiter of waiters) waiter.reject(err);
    if (!this.closedByUser) this.emit("error", { code: err.code || "sse_reopen_failed", message: err.message });
    const orphan = this.orphan;
    this.orphan = null;
    if (orphan && !this.conn) this.failed(orphan.code, orphan.reason);
  }

  replaced(es) {
    const old = this.conn;
    this.conn = es;
    this.replacement = null;
    this.orphan = null;
    old?.close();
    const waiters = this.replacementWaiters || [];
    this.replacementWaiters = [];
    this.reopening = false;
    for (const waiter of waiters) waiter.resolve();
    if (this.reopenWaiters.length) this.startReopen();
  }

  /** A client message over POST /api/messages (on SSE), resolved with the server's answer. */
  async post(message) {
    const ref = this.nextRef++;
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), this.requestTimeout);
    const send = (token) =>
      fetch(`${this.httpBase()}/api/messages`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
        body: JSON.stringify({ ...message, ref }),
        signal: controller.signal,
      });
    try {
      let response = await send(this.token ?? (await this.getToken()));
      if (response.status === 401) {
        // The token may have expired since the stream opened: once more with a fresh one.
        this.token = await this.getToken();
        response = await send(this.token);
      }
      const answer = await response.json().catch(() => ({}));
      if (!response.ok || answer.type === "error") {
        // A client message's error (as on the WebSocket), or the HTTP APIs' shape.
        const error = answer.type === "error" ? answer : { code: answer.error, message: answer.message };
        throw failure(error.message || `HTTP ${response.status}`, error.code || "http_error", {
          ...error,
          status: response.status,
        });
      }
      return answer;
    } catch (err) {
      if (err.name === "AbortError") throw failure("no answer", "timeout");
      if (err instanceof TypeError) throw failure(err.message, "not_connected");
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  // --- messages from the server ------------------------------------------------------

  receive(text, source) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    if (source !== this.conn && source !== this.replacement) return; // a stream already let go
    if (this.role === "leader") this.relay({ kind: "message", message });
    this.emit("message", message);
    switch (message.type) {
      case "welcome":
        if (source === this.replacement) {
          this.replaced(source); // the same session, continued: no new welcome or state
          break;
        }
        this.welcomed = true;
        this.attempt = 0;
        this.failures = 0;
        this.session = message.session;
        this.setState("open", { resumed: message.resumed, session: message.session });
        this.welcome({ ...message, transport: this.transport });
        // On SSE the subscriptions are on the stream's URL already.
        if (this.transport === "websocket") {
          for (const channel of this.topics) this.request({ type: "subscribe", channel }).catch(() => {});
        }
        break;
      case "notification":
        this.notification(message);
        break;
      case "refresh_required":
        if (source === this.conn) this.refresh();
        break;
      case "close":
        this.streamClosed(source, message.code, message.reason);
        break;
      case "error":
        if (this.transport === "sse" && message.ref === undefined && this.answerChannel(message)) break;
        if (!this.settle(message.ref, null, message)) this.emit("error", message);
        break;
      case "subscribed":
        if (this.transport === "sse" && message.ref === undefined) this.answerChannel(message);
        else this.settle(message.ref, message, null);
        break;
      default:
        if (message.ref !== undefined) this.settle(message.ref, message, null);
    }
  }

  welcome(message) {
    this.lastWelcome = message;
    this.emit("welcome", message);
    if (this.role === "leader") this.relay({ kind: "welcome", message });
  }

  /** A notification from the connection or relayed by the leader tab: once per channel
   * and id (ids are the publisher's, unique per channel, as notifyd dedupes), in order. */
  notification(message) {
    if (this.recent.seen(`${message.channel} ${message.id}`)) return;
    this.lastId = message.id;
    this.lastTs = message.ts;
    this.emit("notification", message);
  }

  /** SSE `event: close`: the server ends the stream with this code. */
  streamClosed(es, code, reason) {
    es.close();
    if (es === this.replacement) {
      this.replacementFailed(failure(reason || "closed", `closed_${code}`));
    } else if (this.replacement) {
      // The old stream ends (its token expired) while its replacement is on the way: that
      // one takes over; should it fail, this close is what reconnects (replacementFailed).
      this.conn = null;
      this.orphan = { code, reason };
    } else {
      this.closed(es, code, reason);
    }
  }

  async refresh() {
    if (this.transport === "sse") {
      this.reopenStream().catch(() => {}); // on failure the old stream's close reconnects
      return;
    }
    try {
      const token = await this.getToken();
      this.conn?.send(JSON.stringify({ type: "refresh", token }));
      this.token = token;
    } catch (err) {
      this.emit("error", { code: "token_unavailable", message: String(err) });
    }
  }

  closed(conn, code, reason) {
    if (conn !== this.conn) return;
    this.conn = null;
    this.failed(code, reason);
  }

  /** The connection in use is gone (or never came): settle what waits, then reconnect or stop. */
  failed(code, reason) {
    for (const [ref, waiter] of this.pending) {
      clearTimeout(waiter.timer);
      waiter.reject(failure("connection closed", "closed"));
      this.pending.delete(ref);
    }
    if (this.replacement || this.reopenWaiters.length) this.replacementFailed(failure("connection closed", "closed"));
    // Still wanted: the next stream's URL has the channel.
    for (const settle of [...this.channelWaiters.values()]) settle(null, failure("connection closed", "closed"), true);
    if (this.closedByUser) {
      this.setState("closed", { code, reason });
      return;
    }
    if (FATAL.has(code)) {
      this.emit("error", { code: `closed_${code}`, message: reason || "closed by the server" });
      this.setState("closed", { code, reason });
      this.active = false; // connect() may try again
      // Another tab, with its own token, may fare better: let it lead.
      if (this.role === "leader") this.leaveTabs();
      return;
    }
    if (NEEDS_TOKEN.has(code)) this.emit("error", { code: `closed_${code}`, message: reason });
    if (this.welcomed || this.transportOption !== "auto") {
      this.scheduleReconnect(code, reason);
      return;
    }
    this.countFailure(code).then(() => this.scheduleReconnect(code, reason));
  }

  /** "auto": count an attempt that failed before the welcome; switch transports past FALLBACK_AFTER. */
  async countFailure(code) {
    if (this.transport === "websocket") {
      // Only a WebSocket that never got through counts, and only while the gateway's HTTP
      // answers: a gateway that is down or restarting is no reason to leave WebSockets.
      if (code !== ABNORMAL || !(await this.httpReachable())) return;
    }
    this.failures += 1;
    if (this.failures < FALLBACK_AFTER || this.closedByUser) return;
    this.failures = 0;
    this.transport = this.transport === "websocket" ? "sse" : "websocket";
    this.fallback = this.transport === "sse";
    this.emit("transport", { transport: this.transport, fallback: this.fallback });
  }

  /** True if the gateway answers HTTP at all (an opaque answer is enough: no CORS needed). */
  async httpReachable() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), 3000);
    try {
      await fetch(`${this.httpBase()}/healthz`, { mode: "no-cors", cache: "no-store", signal: controller.signal });
      return true;
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  scheduleReconnect(code, reason) {
    if (this.closedByUser) return;
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
    this.active = false;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.replacement?.close();
    this.replacement = null;
    if (this.role) this.leaveTabs();
    const conn = this.conn;
    if (conn && this.transport === "websocket") {
      conn.close(1000, "client closed"); // onclose reports "closed"
      return;
    }
    this.conn = null;
    conn?.close();
    this.failed(1000, "client closed");
  }

  // --- requests ----------------------------------------------------------------------

  /** Send a client message; resolves with the server's answer (rejects with its error). */
  request(message) {
    if (this.role === "follower") return this.forward(message);
    if (this.transport === "sse") return this.sseRequest(message);
    return new Promise((resolve, reject) => {
      const ws = this.conn;
      if (!ws || ws.readyState !== 1) {
        reject(failure("not connected", "not_connected"));
        return;
      }
      const ref = this.nextRef++;
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(failure("no answer", "timeout"));
      }, this.requestTimeout);
      this.pending.set(ref, { resolve, reject, timer });
      ws.send(JSON.stringify({ ...message, ref }));
    });
  }

  /** On SSE, subscriptions are the stream's query parameters: reopen it; the rest is POSTed. */
  async sseRequest(message) {
    const { type, channel } = message;
    if (type !== "subscribe" && type !== "unsubscribe") return this.post(message);
    if (!this.conn) throw failure("not connected", "not_connected");
    const wanted = type === "subscribe";
    if (this.conn.channels?.has(channel) === wanted) {
      // Only a change reopens: tabs resubscribing after every welcome must not loop.
      return { type: wanted ? "subscribed" : "unsubscribed", channel };
    }
    if (!wanted) {
      this.relayedTopics.delete(channel);
      this.topics.delete(channel);
      await this.reopenStream();
      return { type: "unsubscribed", channel };
    }
    this.relayedTopics.add(channel);
    // The new stream answers its subscribe query after its welcome: `subscribed`, or an
    // `error` naming the channel.
    const answered = new Promise((resolve, reject) => {
      const timer = setTimeout(() => settle(null, failure("no answer", "timeout")), this.requestTimeout);
      const settle = (answer, error, keep = false) => {
        clearTimeout(timer);
        this.channelWaiters.delete(channel);
        if (answer) resolve(answer);
        else if (keep) reject(error);
        else {
          this.relayedTopics.delete(channel); // not asked for again at each reopen
          this.topics.delete(channel);
          reject(error);
        }
      };
      this.channelWaiters.set(channel, settle);
    });
    this.reopenStream().catch((err) => this.channelWaiters.get(channel)?.(null, err, err.code === "closed"));
    return answered;
  }

  /** SSE: a `subscribed` or `error` event that answers a waiting subscribe(); true if one did. */
  answerChannel(message) {
    if (message.type === "subscribed") {
      const settle = this.channelWaiters.get(message.channel);
      settle?.(message, null);
      return Boolean(settle);
    }
    const text = String(message.message ?? "");
    if (message.channel !== undefined) {
      const settle = this.channelWaiters.get(message.channel);
      settle?.(null, Object.assign(new Error(text), message));
      return Boolean(settle);
    }
    for (const [channel, settle] of this.channelWaiters) {
      if (text.includes(channel)) { // a server older than the error's `channel` field
        settle(null, Object.assign(new Error(text), message, { channel }));
        return true;
      }
    }
    return false;
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

  /** A page of a channel's history, newest first (`before`: an id, for the next page). */
  history(channel, { limit, before } = {}) {
    const message = { type: "history", channel };
    if (limit != null) message.limit = limit;
    if (before != null) message.before = before;
    return this.request(message);
  }

  ping() {
    return this.request({ type: "ping" });
  }

  // --- one connection for all tabs (shareAcrossTabs) -------------------------------

  /**
   * Wait for the group's Web Lock (held until this tab closes or close() is called);
   * until granted, follow the leader over the BroadcastChannel.
   */
  joinTabs() {
    this.tabId = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
    this.role = "follower";
    this.channel = new BroadcastChannel(this.shareName);
    this.channel.onmessage = (event) => this.onRelay(event.data);
    this.lockAbort = new AbortController();
    globalThis.navigator.locks
      .request(this.shareName, { signal: this.lockAbort.signal }, () => this.lead())
      .catch(() => {}); // AbortError: close() while still waiting
    this.setState("connecting", { attempt: 0 });
    this.relay({ kind: "hello", from: this.tabId });
  }

  /** The lock's holder: take over the connection, resuming from the last id this tab saw. */
  lead() {
    return new Promise((release) => {
      if (this.closedByUser) {
        release();
        return;
      }
      this.releaseLock = release;
      this.role = "leader";
      // "auto" keeps what the previous leader found out (e.g. its fallback to SSE).
      if (this.transportOption !== "auto") this.transport = this.transportOption;
      this.rejectForwarded("the leader tab changed");
      this.relay({ kind: "leader", from: this.tabId });
      this.attempt = 0;
      this.open();
    });
  }

  leaveTabs() {
    this.lockAbort?.abort();
    this.releaseLock?.();
    this.releaseLock = null;
    this.rejectForwarded("closed");
    this.channel?.close();
    this.channel = null;
    this.role = null;
  }

  relay(message) {
    this.channel?.postMessage(message);
  }

  /** A follower's request goes to the leader, which answers with what its connection got. */
  forward(message) {
    return new Promise((resolve, reject) => {
      const id = this.nextRef++;
      const timer = setTimeout(() => {
        this.forwarded.delete(id);
        reject(failure("no answer from the leader tab", "timeout"));
      }, this.requestTimeout);
      this.forwarded.set(id, { resolve, reject, timer });
      this.relay({ kind: "request", from: this.tabId, id, message });
    });
  }

  rejectForwarded(why) {
    for (const [id, waiter] of this.forwarded) {
      clearTimeout(waiter.timer);
      waiter.reject(failure(why, "closed"));
      this.forwarded.delete(id);
    }
  }

  onRelay(message) {
    switch (message.kind) {
      case "hello": // a new tab: tell it where things stand, so it can take over later
        if (this.role === "leader") {
          const { lastState: state, lastWelcome: welcome, lastId, lastTs } = this;
          this.relay({ kind: "sync", to: message.from, state, welcome, lastId, lastTs });
        }
        break;
      case "sync":
        if (message.to !== this.tabId || this.role !== "follower") break;
        if (!this.lastId && message.lastId) {
          this.lastId = message.lastId;
          this.lastTs = message.lastTs;
        }
        if (message.state) this.followState(message.state);
        if (message.state?.state === "open" && message.welcome) this.followWelcome(message.welcome);
        break;
      case "leader":
        if (this.role === "follower") this.rejectForwarded("the leader tab changed");
        break;
      case "state":
        if (this.role === "follower") this.followState(message.event);
        break;
      case "welcome":
        if (this.role === "follower") this.followWelcome(message.message);
        break;
      case "message":
        if (this.role !== "follower") break;
        this.emit("message", message.message);
        if (message.message.type === "notification") this.notification(message.message);
        else if (message.message.type === "error" && message.message.ref === undefined) this.emit("error", message.message);
        break;
      case "request":
        if (this.role === "leader") this.answer(message);
        break;
      case "answer": {
        const waiter = message.to === this.tabId ? this.forwarded.get(message.id) : undefined;
        if (!waiter) break;
        clearTimeout(waiter.timer);
        this.forwarded.delete(message.id);
        if (message.ok) waiter.resolve(message.value);
        else waiter.reject(Object.assign(new Error(message.error.message), message.error));
        break;
      }
    }
  }

  followState(event) {
    this.state = event.state;
    this.transport = event.transport;
    this.fallback = Boolean(event.fallback);
    if (event.state === "reconnecting" && event.attempt) this.reconnects += 1;
    this.lastState = { ...event, role: "follower" };
    this.emit("state", this.lastState);
  }

  /** The leader's connection was welcomed (or was open when this tab joined). */
  followWelcome(message) {
    this.session = message.session;
    this.lastWelcome = message;
    this.emit("welcome", message);
    // This tab's subscriptions, on the leader's connection (after each of its welcomes).
    for (const channel of this.topics) this.forward({ type: "subscribe", channel }).catch(() => {});
  }

  async answer({ from, id, message }) {
    let reply;
    try {
      reply = { ok: true, value: await this.request(message) };
    } catch (err) {
      reply = { ok: false, error: errorData(err) };
    }
    this.relay({ kind: "answer", to: from, id, ...reply });
  }

  // --- HTTP --------------------------------------------------------------------------

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
