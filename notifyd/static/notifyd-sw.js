// notifyd service worker: shows the notifications `notifyd webpush` sends while no
// tab holds a socket. Serve it from your application's origin (a service worker
// controls only its own origin), e.g. copy /notifyd-sw.js next to your pages, and call
// `client.enablePush("/notifyd-sw.js")`.
//
// The push payload is the WebSocket `notification` message: {type, id, channel,
// event?, data, ts}, with `truncated: true` and no `data` when it was too big for a
// push message. If `data` has `title`, `body`, `icon` or `url`, they are used;
// otherwise the event name and a JSON preview are shown. The notification id is the
// tag, so a notification delivered twice replaces itself instead of doubling.

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("push", (event) => {
  let message = {};
  try {
    message = event.data ? event.data.json() : {};
  } catch (err) {
    message = { data: event.data ? event.data.text() : "" };
  }
  const data = message.data && typeof message.data === "object" ? message.data : {};
  const title = String(data.title || message.event || "New notification");
  const body =
    typeof data.body === "string"
      ? data.body
      : message.truncated
        ? "Open the app to see it."
        : JSON.stringify(message.data ?? "").slice(0, 200);
  const options = {
    body,
    tag: message.id || undefined,
    timestamp: message.ts || Date.now(),
    data: { url: typeof data.url === "string" ? data.url : "/", notification: message },
  };
  if (typeof data.icon === "string") options.icon = data.icon;
  event.waitUntil(
    (async () => {
      // Tell open pages too (they may render it in-app rather than as a popup).
      const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
      for (const client of windows) client.postMessage({ type: "notifyd-push", notification: message });
      await self.registration.showNotification(title, options);
    })(),
  );
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  let url = new URL(event.notification.data?.url || "/", self.location.origin).href;
  if (new URL(url).origin !== self.location.origin) url = self.location.origin + "/"; // same origin only
  event.waitUntil(
    (async () => {
      const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
      for (const client of windows) {
        if (client.url === url && "focus" in client) return client.focus();
      }
      return self.clients.openWindow(url);
    })(),
  );
});
