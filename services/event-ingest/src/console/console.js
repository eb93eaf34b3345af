// corral console: refreshes the live parts of a page (anything with
// data-refresh) and renders a run's events: a page at a time from the event
// API, then, on the last page of a live run, its live tail.
"use strict";
(() => {
  const REFRESH_MS = 2000;
  const PAGE = 500;
  // A live page keeps at most this many events; older ones are on the pages.
  const LIVE_WINDOW = 2000;

  const make = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  };

  function banner(text) {
    let note = document.getElementById("console-banner");
    if (!note) {
      note = make("p", "notice");
      note.id = "console-banner";
      note.setAttribute("role", "status");
      document.querySelector("main").prepend(note);
    }
    note.textContent = text;
  }

  // Refreshes `node` from its fragment URL; keeps ticked boxes ticked and
  // leaves it alone while someone types in it.
  function refresh(node) {
    const tick = async () => {
      const active = document.activeElement;
      const typing = node.contains(active) && active.matches("input[type=text], textarea, select");
      if (!document.hidden && !typing) {
        try {
          const res = await fetch(node.dataset.refresh, { credentials: "same-origin" });
          if (res.status === 401) {
            banner("Signed out: reload the page to sign in again.");
            return;
          }
          if (res.ok) {
            const html = await res.text();
            // Read the boxes only now: one ticked while the fetch was out counts.
            const ticked = new Set(
              [...node.querySelectorAll("input[type=checkbox]:checked")].map((box) => box.value));
            node.innerHTML = html;
            for (const box of node.querySelectorAll("input[type=checkbox]")) {
              if (ticked.has(box.value)) box.checked = true;
            }
            node.dispatchEvent(new CustomEvent("refreshed"));
          }
        } catch (_) {
          // Unreachable for a moment: the next tick tries again.
        }
      }
      setTimeout(tick, REFRESH_MS);
    };
    setTimeout(tick, REFRESH_MS);
  }

  function details(label, text, open) {
    const box = make("details");
    box.open = open;
    box.append(make("summary", null, label), make("pre", null, text));
    return box;
  }

  function diff(text, truncated) {
    const pre = make("pre", "diff");
    for (const line of (text || "").split("\n")) {
      let cls = "ctx";
      if (line.startsWith("+++") || line.startsWith("---") || line.startsWith("diff ")) cls = "file";
      else if (line.startsWith("@@")) cls = "hunk";
      else if (line.startsWith("+")) cls = "add";
      else if (line.startsWith("-")) cls = "del";
      pre.append(make("span", cls, line + "\n"));
    }
    if (truncated) pre.append(make("span", "cut", "… cut: the diff is longer than ingest keeps\n"));
    return pre;
  }

  // One event as an <article>; null when it was folded into an earlier one
  // (a tool's result goes under its call).
  function render(ev, tools) {
    const row = make("article", "ev " + ev.kind.replace(/\./g, "-"));
    row.id = "ev-" + ev.cursor;
    row.dataset.cursor = ev.cursor;
    const head = make("header");
    const at = new Date(ev.at_ms);
    const time = make("time", null, isNaN(at) ? "" : at.toISOString().slice(11, 23));
    if (!isNaN(at)) time.dateTime = at.toISOString();
    head.append(time, " ", make("span", "kind", ev.kind));
    row.append(head);
    const d = ev.data || {};
    switch (ev.kind) {
      case "agent.output":
        row.append(make("pre", d.stream === "stderr" ? "out stderr" : "out", d.line));
        break;
      case "agent.assistant_message":
      case "agent.message":
      case "agent.system_message":
      case "agent.user_tool_result":
      case "agent.waiting":
        if (d.role) head.append(" ", make("span", "role", d.role));
        row.append(make("div", "text", d.text));
        break;
      case "agent.tool_use":
        head.append(" ", make("strong", "tool", d.tool));
        row.append(details("arguments", JSON.stringify(d.input, null, 2), true));
        if (d.tool_use_id) tools.set(d.tool_use_id, row);
        break;
      case "agent.tool_completed": {
        const call = d.tool_use_id ? tools.get(d.tool_use_id) : undefined;
        const label = (d.is_error ? "error" : "result") + (d.duration_ms ? ` · ${d.duration_ms} ms` : "");
        const result = details(label, d.result, (d.result || "").length < 2000);
        if (d.is_error) result.classList.add("failed");
        if (call) {
          call.append(result);
          return null;
        }
        row.append(result);
        break;
      }
      case "agent.file_edited":
        head.append(" ", make("code", "path", d.path));
        row.append(diff(d.unified_diff, ev.truncated));
        break;
      case "agent.started":
        row.append(make("div", "text",
          [d.model && "model " + d.model, d.session_id && "session " + d.session_id].filter(Boolean).join(" · ")));
        break;
      case "agent.completed":
        row.append(make("div", "text", d.summary));
        break;
      case "agent.error":
        row.append(make("div", "text failed", d.message));
        break;
      case "agent.heartbeat":
        row.classList.add("quiet");
        break;
      default:
        row.append(make("pre", null, JSON.stringify(d)));
    }
    return row;
  }

  function pageLink(text, after, kind, rel) {
    const params = new URLSearchParams();
    if (after > 0) params.set("after", String(after));
    if (kind) params.set("kind", kind);
    const link = make("a", null, text);
    link.href = location.pathname + (params.size ? "?" + params : "");
    if (rel) link.rel = rel;
    return link;
  }

  async function events(box) {
    const run = box.dataset.run;
    const kind = box.dataset.kind;
    const after = Number(box.dataset.after || 0);
    const tools = new Map();
    const params = new URLSearchParams({ after: String(after), limit: String(PAGE) });
    if (kind) params.set("kind", kind);
    let page;
    try {
      const res = await fetch(`/v1/runs/${encodeURIComponent(run)}/events?${params}`, { credentials: "same-origin" });
      if (!res.ok) throw new Error(`${res.status}: ${await res.text()}`);
      page = await res.json();
    } catch (err) {
      box.textContent = "Events unavailable: " + err.message + " (reload to try again)";
      box.removeAttribute("aria-busy");
      return;
    }
    box.textContent = "";
    const rows = document.createDocumentFragment();
    for (const ev of page.events) {
      const row = render(ev, tools);
      if (row) rows.append(row);
    }
    box.append(rows);
    box.removeAttribute("aria-busy");
    box.dataset.loaded = "true";
    const nav = document.getElementById("event-pages");
    if (after > 0) nav.append(pageLink("← First page", 0, kind, "first"), " ");
    if (page.events.length >= PAGE) {
      nav.append(pageLink("Next page →", page.next_after, kind, "next"));
      return;
    }
    if (page.events.length === 0) box.append(make("p", "muted empty", "No events yet."));
    if (box.dataset.live === "true") tail(box, run, kind, page.next_after, tools);
  }

  // The run's events after `after`, live, until the run has ended.
  function tail(box, run, kind, after, tools) {
    const source = new EventSource(`/v1/runs/${encodeURIComponent(run)}/events/stream?after=${after}`);
    const kinds = (box.dataset.kinds || "").split(",").filter(Boolean);
    const add = (message) => {
      let ev;
      try {
        ev = JSON.parse(message.data);
      } catch (_) {
        return;
      }
      if (kind && ev.kind !== kind) return;
      const following = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
      box.querySelector(".empty")?.remove();
      const row = render(ev, tools);
      if (row) box.append(row);
      while (box.childElementCount > LIVE_WINDOW) box.firstElementChild.remove();
      if (following) window.scrollTo(0, document.body.scrollHeight);
    };
    for (const name of kinds) source.addEventListener(name, add);
    box.dataset.tailing = "true";
    // Once the run has ended its last events are in; the tail can go.
    document.getElementById("status")?.addEventListener("refreshed", () => {
      const facts = document.querySelector("#status .facts");
      const state = facts ? facts.dataset.state : "";
      if (["completed", "failed", "stopped", "timed_out"].includes(state) && box.dataset.tailing === "true") {
        box.dataset.tailing = "ending";
        setTimeout(() => {
          source.close();
          box.dataset.tailing = "false";
        }, 5000);
      }
    });
  }

  function selectAll() {
    const form = document.getElementById("runs-form");
    if (!form) return;
    const head = form.querySelector("thead th");
    if (!head) return;
    const all = make("input");
    all.type = "checkbox";
    all.setAttribute("aria-label", "select every live run on this page");
    all.addEventListener("change", () => {
      for (const box of form.querySelectorAll("tbody input[type=checkbox]")) box.checked = all.checked;
    });
    head.append(all);
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const node of document.querySelectorAll("[data-refresh]")) refresh(node);
    const box = document.getElementById("events");
    if (box) events(box);
    selectAll();
  });
})();
