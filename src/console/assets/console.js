// The console's only script: live refresh and copy buttons. Pages work without it (they are
// plain HTML and forms); it is served from the same origin because the Content-Security-Policy
// allows no inline script.
"use strict";

// A page whose <main> names an event stream refreshes itself when the server says it changed:
// it fetches its own URL again and swaps <main>'s content, keeping open <details> open.
function live(main) {
  const url = main.dataset.live;
  if (!url || !window.EventSource) return;
  let pending = null;
  const refresh = async () => {
    pending = null;
    // Never swap the page under someone typing: try again once the field is left.
    const focused = document.activeElement;
    if (focused && main.contains(focused) && focused.matches("input, textarea, select")) {
      pending = setTimeout(refresh, 1000);
      return;
    }
    const open = [...main.querySelectorAll("details[open] pre[id]")].map((p) => p.id);
    const resp = await fetch(location.href, { credentials: "same-origin" });
    if (!resp.ok) return;
    const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
    const fresh = doc.querySelector("main#live");
    if (!fresh) return;
    main.innerHTML = fresh.innerHTML;
    for (const id of open) {
      const pre = document.getElementById(id);
      const details = pre && pre.closest("details");
      if (details) details.open = true;
    }
    main.dataset.refreshed = String(Number(main.dataset.refreshed || 0) + 1);
    if (!fresh.dataset.live) source.close();
  };
  const source = new EventSource(url);
  source.addEventListener("changed", () => {
    // Several commits in a burst make one refresh.
    if (!pending) pending = setTimeout(refresh, 150);
  });
}

document.addEventListener("click", (e) => {
  const button = e.target.closest("button.copy");
  if (!button) return;
  const target = document.getElementById(button.dataset.copy);
  if (!target || !navigator.clipboard) return;
  navigator.clipboard.writeText(target.textContent).then(() => {
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
});

const main = document.querySelector("main#live");
if (main) live(main);
