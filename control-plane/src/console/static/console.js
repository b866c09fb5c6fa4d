// fleetml console: refreshes the live regions of a page (elements with data-live="N")
// every N seconds from a fresh copy of the same page, while the tab is visible. The
// pages read the same without it.
"use strict";
(function () {
  function refresh(id, seconds) {
    setTimeout(async function tick() {
      if (!document.hidden) {
        try {
          const r = await fetch(location.href, {
            credentials: "same-origin",
            headers: { "X-Fleetml-Refresh": "1" },
          });
          if (r.redirected && r.url.indexOf("/ui/login") >= 0) {
            location.assign(r.url);
            return;
          }
          if (r.ok) {
            const doc = new DOMParser().parseFromString(await r.text(), "text/html");
            const fresh = doc.getElementById(id);
            const now = document.getElementById(id);
            // Never swap what the keyboard is in (a focused link or field).
            if (fresh && now && !now.contains(document.activeElement)) {
              now.replaceWith(document.importNode(fresh, true));
            }
          }
        } catch (e) {
          // Offline or restarting: try again next time.
        }
      }
      setTimeout(tick, seconds * 1000);
    }, seconds * 1000);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(function (el) {
      const seconds = Math.max(1, parseInt(el.getAttribute("data-live"), 10) || 5);
      if (el.id) refresh(el.id, seconds);
    });
  });
})();
