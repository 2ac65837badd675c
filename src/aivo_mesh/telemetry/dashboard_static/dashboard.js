// aivo-mesh dashboard: reads the observer's JSON API on the same origin and draws it as SVG.
// No dependencies, no build step. Every value from the API reaches the page through textContent or an
// SVG attribute, never as HTML. The page's Content-Security-Policy allows no inline script or style.
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const HISTORY_WINDOW = 300; // seconds of history plotted
  const HISTORY_EVERY = 5000; // ms between history refreshes (the plots move slowly)
  const TRACES_EVERY = 5000; // ms between trace refreshes
  const TRACES_SHOWN = 5; // as `meshctl traces --errors` (its --last)
  const state = {
    windowSeconds: 60, interval: 2, mesh: null, refreshes: 0, failingSince: null,
    selectedRoute: null, pendingReset: null, traceIds: [],
  };

  // -- small helpers --------------------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function svg(tag, attrs = {}, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = String(v);
      else if (k === "class") node.setAttribute("class", v);
      else node.setAttribute(k, String(v));
    }
  }

  const num = (x) => typeof x === "number" && Number.isFinite(x);
  const fmtRps = (x) => (num(x) ? (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2)) : "–");
  const fmtPct = (x) => (num(x) ? (x * 100).toFixed(x >= 0.9995 ? 0 : 1) + " %" : "–");
  const fmtMs = (x) => (num(x) ? (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2)) : "–");
  const clock = (unixSeconds) => new Date(unixSeconds * 1000).toLocaleTimeString([], { hour12: false });

  // Health class of a golden-metrics block: idle (no calls), ok (>= 99 %), warn (>= 95 %), bad.
  function goldenClass(g) {
    if (!g || !g.requests || !num(g.success_rate)) return "idle";
    if (g.success_rate >= 0.99) return "ok";
    if (g.success_rate >= 0.95) return "warn";
    return "bad";
  }

  function serviceClass(s) {
    if (s.health !== "healthy") return "bad";
    const g = goldenClass(s.server);
    return g === "idle" ? "ok" : g;
  }

  function badge(text, cls) {
    return el("span", { class: `badge ${cls}`, text });
  }

  async function getJSON(url, options) {
    const response = await fetch(url, { cache: "no-store", ...options });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const why = body && body.error ? body.error : response.statusText;
      throw new Error(`${response.status} ${why}`);
    }
    return body;
  }

  // -- the mesh document: topology, tables --------------------------------------------------------------

  async function meshLoop() {
    await loadMesh();
    setTimeout(meshLoop, state.interval * 1000);
  }

  async function loadMesh() {
    const started = performance.now();
    const url = `/api/v1/mesh?window=${state.windowSeconds}`;
    try {
      const mesh = await getJSON(url);
      state.mesh = mesh;
      state.interval = num(mesh.interval_seconds) && mesh.interval_seconds > 0 ? mesh.interval_seconds : 2;
      state.failingSince = null;
      render(mesh);
      state.refreshes += 1;
      const refresh = document.getElementById("refresh");
      refresh.className = "refresh";
      refresh.dataset.refreshes = String(state.refreshes);
      refresh.textContent = `refreshed ${clock(Date.now() / 1000)} (data generated ${clock(mesh.generated_at)}, ` +
        `${Math.round(performance.now() - started)} ms); the page asks every ${state.interval} s, ` +
        `the observer samples every ${state.interval} s; rates over the last ${mesh.window_seconds} s`;
      document.body.classList.remove("stale");
    } catch (err) {
      state.failingSince = state.failingSince || Date.now() / 1000;
      const refresh = document.getElementById("refresh");
      refresh.className = "refresh error";
      refresh.textContent = `the observer does not answer ${url} since ${clock(state.failingSince)} ` +
        `(${err.message}); is the mesh still up? (meshctl status)`;
      document.body.classList.add("stale");
    }
  }

  function render(mesh) {
    document.getElementById("plane").textContent = `plane: ${mesh.plane || "?"}`;
    document.getElementById("source").textContent =
      `data source: ${mesh.source || "the observer"}, served by the observer at ${location.host} ` +
      `(GET /api/v1/mesh, /api/v1/history, /api/v1/traces)`;
    renderTopology(mesh);
    renderServices(mesh);
    renderRoutes(mesh);
    renderUpstreams(mesh);
    renderControlPlane(mesh);
  }

  // Layered layout: a node's column is the longest call path reaching it (callers left of callees), rows
  // ordered by the mean row of their callers, so that edges cross little. Enough for 4-10 services.
  function layout(names, edges) {
    const rank = new Map(names.map((n) => [n, 0]));
    for (let i = 0; i < names.length; i += 1) { // longest path, bounded: a cycle cannot loop forever
      let changed = false;
      for (const e of edges) {
        if (e.from === e.to) continue;
        if (rank.get(e.to) < rank.get(e.from) + 1 && rank.get(e.from) + 1 < names.length) {
          rank.set(e.to, rank.get(e.from) + 1);
          changed = true;
        }
      }
      if (!changed) break;
    }
    const columns = [];
    for (const n of names) (columns[rank.get(n)] = columns[rank.get(n)] || []).push(n);
    const row = new Map();
    columns.forEach((col, c) => {
      if (c > 0) {
        const mean = (n) => {
          const rows = edges.filter((e) => e.to === n && row.has(e.from)).map((e) => row.get(e.from));
          return rows.length ? rows.reduce((a, b) => a + b, 0) / rows.length : 0;
        };
        col.sort((a, b) => mean(a) - mean(b) || a.localeCompare(b));
      } else {
        col.sort((a, b) => a.localeCompare(b));
      }
      col.forEach((n, r) => row.set(n, r - (col.length - 1) / 2));
    });
    return { columns: columns.filter(Boolean), rank, row };
  }

  function renderTopology(mesh) {
    const root = document.getElementById("topology");
    const services = new Map((mesh.services || []).map((s) => [s.name, s]));
    const edges = (mesh.edges || []).filter((e) => e.from && e.to);
    const names = [...services.keys()];
    for (const e of edges) for (const n of [e.from, e.to]) if (!names.includes(n)) names.push(n);
    const { columns, rank, row } = layout(names, edges);
    const W = 190, H = 58, GAP_X = 150, GAP_Y = 44, LANE = 46;
    const tallest = Math.max(1, ...columns.map((c) => c.length));
    const width = columns.length * W + (columns.length - 1) * GAP_X + 40;
    // Lanes above and below the nodes carry the edges that skip a column, clear of the nodes between.
    const height = tallest * H + (tallest - 1) * GAP_Y + 2 * LANE + 20;
    const pos = new Map(names.map((n) => [n, {
      x: 20 + rank.get(n) * (W + GAP_X),
      y: height / 2 + row.get(n) * (H + GAP_Y) - H / 2,
    }]));
    root.setAttribute("viewBox", `0 0 ${width} ${height}`);
    root.setAttribute("width", String(width));
    root.setAttribute("height", String(height));
    const defs = svg("defs", {}, ...["ok", "warn", "bad", "idle"].map((c) => svg("marker", {
      id: `arrow-${c}`, viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7,
      orient: "auto-start-reverse",
    }, svg("path", { d: "M0,0 L10,5 L0,10 z", class: `marker-${c}` }))));
    const edgeLayer = svg("g", { class: "edges" });
    const labelLayer = svg("g", { class: "labels" });
    for (const e of edges) {
      const a = pos.get(e.from), b = pos.get(e.to);
      const cls = goldenClass(e.golden);
      const span = rank.get(e.to) - rank.get(e.from);
      // Cubic Bézier control points: to the next column, a plain S-curve; further, through the lane above
      // (or below, for a node below the middle); to the same or an earlier column, a loop under the nodes.
      let p;
      if (span === 1) {
        const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
        p = [[x1, y1], [x1 + GAP_X / 2, y1], [x2 - GAP_X / 2, y2], [x2, y2]];
      } else if (span > 1) {
        const above = row.get(e.to) <= 0;
        const lane = above ? 8 : height - 8;
        const x1 = a.x + W / 2, y1 = above ? a.y : a.y + H, x2 = b.x + W / 2, y2 = above ? b.y : b.y + H;
        p = [[x1, y1], [x1 + GAP_X / 2, lane], [x2 - GAP_X / 2, lane], [x2, y2]];
      } else {
        const x1 = a.x + W / 2, y1 = a.y + H, x2 = b.x + W / 2, y2 = b.y + H;
        p = [[x1, y1], [x1, height - 4], [x2, height - 4], [x2, y2]];
      }
      const d = `M${p[0]} C${p[1]} ${p[2]} ${p[3]}`;
      const g = e.golden || {};
      const label = `${fmtRps(g.rps)} rps · ${fmtPct(g.success_rate)}`;
      // The label sits on the curve's midpoint, B(1/2) = (P0 + 3 P1 + 3 P2 + P3) / 8.
      const lx = (p[0][0] + 3 * p[1][0] + 3 * p[2][0] + p[3][0]) / 8;
      const ly = (p[0][1] + 3 * p[1][1] + 3 * p[2][1] + p[3][1]) / 8 + 4;
      const group = svg("g", { class: `edge ${cls}`, "data-from": e.from, "data-to": e.to, "data-health": cls,
        "data-success-rate": num(g.success_rate) ? g.success_rate : "" },
      svg("title", { text: `${e.from} → ${e.to} (${e.caller_identity || e.from}): ${g.requests || 0} calls, ` +
        `${label}, p99 ${fmtMs(g.p99_ms)} ms` }),
      svg("path", { d, "marker-end": `url(#arrow-${cls})` }));
      edgeLayer.append(group);
      const text = svg("text", { x: lx, y: ly, "text-anchor": "middle", text: label });
      labelLayer.append(svg("g", { class: `edge ${cls}` },
        svg("rect", { class: "label-bg", x: lx - 52, y: ly - 11, width: 104, height: 15, rx: 3 }), text));
    }
    const nodeLayer = svg("g", { class: "nodes" });
    for (const n of names) {
      const p = pos.get(n), s = services.get(n);
      const cls = s ? serviceClass(s) : "client";
      const sub = s
        ? `${s.plane || mesh.plane || ""} · ${s.health}${s.server && s.server.requests ? ` · ${fmtPct(s.server.success_rate)}` : ""}`
        : "caller (not a service)";
      nodeLayer.append(svg("g", { class: `node ${cls}`, "data-service": n, "data-kind": s ? "service" : "caller",
        "data-health": s ? s.health : "", transform: `translate(${p.x},${p.y})` },
      svg("title", { text: s ? `${n}: ${s.health}` : `${n}: a caller identity` }),
      svg("rect", { width: W, height: H }),
      svg("text", { class: "name", x: W / 2, y: 24, "text-anchor": "middle", text: n }),
      svg("text", { class: "sub", x: W / 2, y: 42, "text-anchor": "middle", text: sub })));
    }
    root.replaceChildren(defs, edgeLayer, nodeLayer, labelLayer);
  }

  function cells(golden) {
    const g = golden || {};
    return [
      el("td", { class: "num rps", text: fmtRps(g.rps) }),
      el("td", { class: "num success", "data-success-rate": num(g.success_rate) ? g.success_rate : "" },
        badge(fmtPct(g.success_rate), goldenClass(g))),
      el("td", { class: "num", text: fmtMs(g.p50_ms) }),
      el("td", { class: "num", text: fmtMs(g.p95_ms) }),
      el("td", { class: "num", text: fmtMs(g.p99_ms) }),
    ];
  }

  function renderServices(mesh) {
    const rows = (mesh.services || []).map((s) => {
      const healthCls = s.health === "healthy" ? "ok" : "bad";
      const c = s.client || {};
      const limited = s.rate_limited && num(s.rate_limited.window_count) ? s.rate_limited.window_count : 0;
      const restarts = s.process && num(s.process.restarts) ? s.process.restarts : "–";
      return el("tr", { "data-service": s.name, "data-health": s.health },
        el("td", { text: s.name }), el("td", { text: s.plane || mesh.plane || "" }),
        el("td", {}, badge(s.health, healthCls)), ...cells(s.server),
        el("td", { class: "num", text: fmtRps(c.rps) }),
        el("td", { class: "num" }, badge(fmtPct(c.success_rate), goldenClass(c))),
        el("td", { class: "num rate-limited" }, badge(String(limited), limited ? "warn" : "idle")),
        el("td", { class: "num", text: restarts }));
    });
    document.querySelector("#services tbody").replaceChildren(...rows);
  }

  function renderRoutes(mesh) {
    const sel = state.selectedRoute;
    const rows = (mesh.routes || []).map((r) => {
      const selected = sel && sel.service === r.service && sel.route === r.route && sel.side === r.side;
      const tr = el("tr", { class: `clickable${selected ? " selected" : ""}`, "data-service": r.service,
        "data-route": r.route, "data-side": r.side },
      el("td", { text: r.service }), el("td", { class: "route", text: r.route }), el("td", { text: r.side }),
      ...cells(r.golden), el("td", { class: "num", text: (r.golden && r.golden.requests) || 0 }));
      tr.addEventListener("click", () => {
        state.selectedRoute = { service: r.service, route: r.route, side: r.side };
        renderRoutes(state.mesh);
        refreshRouteHistory();
      });
      return tr;
    });
    document.querySelector("#routes tbody").replaceChildren(...rows);
  }

  function hostsText(hosts) {
    if (hosts === null || hosts === undefined) return "–";
    if (typeof hosts !== "object") return String(hosts);
    if (Array.isArray(hosts)) return `${hosts.length} hosts`;
    return Object.entries(hosts).map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
  }

  function renderUpstreams(mesh) {
    const rows = [];
    for (const s of mesh.services || []) {
      for (const u of s.upstreams || []) {
        const breaker = u.breaker || null;
        const budget = u.retry_budget;
        const stateCls = u.state === "healthy" ? "ok" : "bad";
        const breakerCls = breaker === "closed" ? "ok" : breaker === "half_open" ? "warn" : breaker ? "bad" : "idle";
        let action = null;
        if (breaker) {
          action = el("button", { type: "button", class: "reset", "data-caller": s.name, "data-upstream": u.service,
            text: "reset breaker" });
          action.addEventListener("click", () => askReset(s.name, u.service, breaker));
        }
        rows.push(el("tr", { "data-caller": s.name, "data-upstream": u.service, "data-breaker": breaker || "",
          "data-state": u.state },
        el("td", { text: s.name }), el("td", { text: u.service }), el("td", { text: hostsText(u.hosts) }),
        el("td", {}, badge(u.state || "?", stateCls)),
        el("td", { class: "breaker" }, badge(breaker ? breaker.replace("_", "-") : "n/a (Envoy)", breakerCls)),
        el("td", { text: budget ? `${budget.used} of ${budget.limit} retries in use` : "–" }),
        el("td", {}, action)));
      }
    }
    if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 7, class: "note", text: "no upstreams sampled" })));
    document.querySelector("#upstreams tbody").replaceChildren(...rows);
  }

  function renderControlPlane(mesh) {
    const root = document.getElementById("control-plane");
    const cp = mesh.control_plane;
    if (!cp) {
      root.replaceChildren(el("p", { class: "note", text: "No control plane sampled: this mesh reads mesh.yaml directly." }));
      return;
    }
    const rows = (cp.nodes || []).map((n) => {
      const nack = n.last_nack;
      return el("tr", { "data-node": n.node },
        el("td", { class: "route", text: n.node }), el("td", { text: n.group || "" }),
        el("td", { text: n.acked_version || "–" }),
        el("td", {}, nack
          ? el("span", { class: "error-text", text: `version ${nack.version} at ${num(nack.at) ? clock(nack.at) : nack.at}: ${nack.message}` })
          : badge("none", "ok")));
    });
    root.replaceChildren(
      el("p", { class: "note", text: `ADS at ${cp.address}: the version each node last ACKed, and its last NACK.` }),
      el("table", {}, el("thead", {}, el("tr", {}, ...["node", "group", "ACKed version", "last NACK"].map(
        (h) => el("th", { text: h })))), el("tbody", {}, ...rows)));
  }

  // -- breaker reset, behind a confirmation ------------------------------------------------------------

  function askReset(caller, upstream, breaker) {
    state.pendingReset = { caller, upstream };
    document.getElementById("reset-question").textContent =
      `Force the circuit breaker of ${caller} towards ${upstream} (now ${breaker.replace("_", "-")}) closed?`;
    document.getElementById("reset-dialog").showModal();
  }

  async function confirmReset() {
    const dialog = document.getElementById("reset-dialog");
    const pending = state.pendingReset;
    dialog.close();
    state.pendingReset = null;
    if (!pending) return;
    const result = document.getElementById("reset-result");
    try {
      const answer = await getJSON("/api/v1/breakers/reset", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ service: pending.caller, upstream: pending.upstream }),
      });
      const cb = answer && (answer.circuit_breaker || (answer.answer && answer.answer.circuit_breaker));
      result.className = "note";
      result.textContent = `reset ${pending.caller} → ${pending.upstream}: breaker now ${cb && cb.state ? cb.state : "closed"}` +
        ` (${clock(Date.now() / 1000)})`;
    } catch (err) {
      result.className = "note error-text";
      result.textContent = `reset ${pending.caller} → ${pending.upstream} failed: ${err.message}`;
    }
    await loadMesh(); // show the breaker's new state now, not at the next tick
  }

  // -- plots ----------------------------------------------------------------------------------------------

  // A small line chart: `series` = [{cls, values: [[t, v|null], ...]}]; a null breaks the line.
  function chart(title, series, { unit = "", fixedMax = null, from, to }) {
    const W = 200, H = 96, L = 34, R = 4, T = 14, B = 14;
    const values = series.flatMap((s) => s.values.map((p) => p[1]).filter(num));
    const max = fixedMax !== null ? fixedMax : Math.max(1e-9, ...values) * 1.1;
    const min = fixedMax !== null && fixedMax === 1 ? Math.min(0.9, ...values) : 0;
    const x = (t) => L + ((t - from) / Math.max(1, to - from)) * (W - L - R);
    const y = (v) => T + (1 - (v - min) / Math.max(1e-9, max - min)) * (H - T - B);
    const label = (v) => (unit === "%" ? `${Math.round(v * 100)}%` : fmtMs(v));
    const parts = [
      svg("text", { class: "title", x: L, y: 10, text: title }),
      svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
      svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
      svg("text", { x: L - 3, y: T + 4, "text-anchor": "end", text: label(max) }),
      svg("text", { x: L - 3, y: H - B, "text-anchor": "end", text: label(min) }),
      svg("text", { x: L, y: H - 2, text: `-${Math.round((to - from) / 60)} min` }),
      svg("text", { x: W - R, y: H - 2, "text-anchor": "end", text: "now" }),
    ];
    if (!values.length) {
      parts.push(svg("text", { class: "empty", x: (L + W) / 2, y: H / 2, "text-anchor": "middle", text: "no calls" }));
    }
    for (const s of series) {
      let run = [];
      const flush = () => { // a lone point (between gaps) is a dot, a run a line
        if (run.length === 1) parts.push(svg("circle", { class: `dot ${s.cls}`, cx: run[0][0], cy: run[0][1], r: 1.8 }));
        if (run.length > 1) parts.push(svg("polyline", { class: s.cls, points: run.map((p) => p.join(",")).join(" ") }));
        run = [];
      };
      for (const [t, v] of s.values) {
        if (num(v)) run.push([x(t).toFixed(1), y(Math.max(min, Math.min(max, v))).toFixed(1)]);
        else flush();
      }
      flush();
    }
    return svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": title }, ...parts);
  }

  function plotGroup(title, points, attrs) {
    const to = Date.now() / 1000, from = to - HISTORY_WINDOW;
    const pick = (k) => points.map((p) => [p.t, p[k]]);
    return el("div", { class: "plot-group", ...attrs }, el("h3", { text: title }), el("div", { class: "plot-row" },
      chart("requests/s", [{ cls: "s-rps", values: pick("rps") }], { from, to }),
      chart("success rate", [{ cls: "s-success", values: pick("success_rate") }], { unit: "%", fixedMax: 1, from, to }),
      chart("latency ms: p50 p95 p99", [
        { cls: "s-p50", values: pick("p50_ms") }, { cls: "s-p95", values: pick("p95_ms") },
        { cls: "s-p99", values: pick("p99_ms") }], { from, to })));
  }

  // Two samples or more in every step, so each point is a rate, not a single sample's guess.
  const historyStep = () => Math.max(2 * state.interval, 5);

  function historyUrl(params) {
    const step = historyStep();
    const q = new URLSearchParams({ ...params, window: String(HISTORY_WINDOW), step: String(step) });
    return `/api/v1/history?${q}`;
  }

  async function refreshHistory() {
    const mesh = state.mesh;
    if (mesh) {
      const groups = await Promise.all((mesh.services || []).map(async (s) => {
        try {
          const h = await getJSON(historyUrl({ service: s.name, side: "server" }));
          return plotGroup(`${s.name} (served)`, h.points || [], { "data-service": s.name });
        } catch (err) {
          return el("div", { class: "plot-group" }, el("h3", { text: s.name }),
            el("p", { class: "error-text", text: `history unavailable: ${err.message}` }));
        }
      }));
      document.getElementById("plots").replaceChildren(...groups);
      document.getElementById("plots-note").textContent =
        `(last ${HISTORY_WINDOW / 60} minutes from /api/v1/history, one point per ${historyStep()} s, ` +
        `refreshed every ${HISTORY_EVERY / 1000} s)`;
      await refreshRouteHistory();
    }
    setTimeout(refreshHistory, HISTORY_EVERY);
  }

  async function refreshRouteHistory() {
    const r = state.selectedRoute;
    const root = document.getElementById("route-plots");
    if (!r) return;
    try {
      const h = await getJSON(historyUrl({ service: r.service, route: r.route, side: r.side }));
      root.replaceChildren(plotGroup(`${r.service} ${r.route} (${r.side})`, h.points || [],
        { "data-route": r.route }));
    } catch (err) {
      root.replaceChildren(el("p", { class: "error-text", text: `history of ${r.route} unavailable: ${err.message}` }));
    }
  }

  // -- failed traces as waterfalls ------------------------------------------------------------------------

  function traceList(doc) {
    return Array.isArray(doc) ? doc : (doc && doc.traces) || [];
  }

  function waterfall(trace) {
    const spans = trace.spans || [];
    const start = trace.start_ns || Math.min(...spans.map((s) => s.start_ns));
    const total = Math.max(1, trace.duration_ns || Math.max(...spans.map((s) => s.end_ns)) - start);
    const byId = new Map(spans.map((s) => [s.span_id, s]));
    const depth = (s) => {
      let d = 0;
      for (let p = byId.get(s.parent_span_id); p && d < 20; p = byId.get(p.parent_span_id)) d += 1;
      return d;
    };
    const LABEL = 380, BAR = 460, ROW = 18, W = LABEL + BAR + 300;
    const rows = spans.map((s, i) => {
      const x = LABEL + ((s.start_ns - start) / total) * BAR;
      const w = Math.max(1.5, ((s.end_ns - s.start_ns) / total) * BAR);
      const y = 4 + i * ROW;
      const ms = (s.end_ns - s.start_ns) / 1e6;
      const failed = s.failed || s.status === "ERROR";
      return svg("g", { class: "span", "data-failed": failed ? "1" : "0" },
        svg("title", { text: `${s.service} ${s.kind} ${s.name}: ${ms.toFixed(2)} ms, status ${s.status}` +
          `${s.status_message ? ` (${s.status_message})` : ""}` }),
        svg("text", { x: 4 + depth(s) * 12, y: y + 12, text: `${s.service} · ${s.name}` }),
        svg("rect", { class: `bar${failed ? " failed" : ""}`, x, y: y + 2, width: w, height: ROW - 6, rx: 2 }),
        svg("text", { class: failed ? "msg" : "", x: Math.min(x + w + 4, LABEL + BAR + 4), y: y + 12,
          text: `${ms.toFixed(1)} ms${failed && s.status_message ? ` ${s.status_message.slice(0, 70)}` : ""}` }));
    });
    const height = 8 + spans.length * ROW;
    return svg("svg", { class: "waterfall", viewBox: `0 0 ${W} ${height}`, width: W, height },
      svg("line", { class: "grid", x1: LABEL, y1: 0, x2: LABEL, y2: height }),
      svg("line", { class: "grid", x1: LABEL + BAR, y1: 0, x2: LABEL + BAR, y2: height }), ...rows);
  }

  function traceCard(trace) {
    const id = trace.trace_id;
    const link = el("a", { href: `#trace=${encodeURIComponent(id)}`, text: id.slice(0, 16) });
    return el("div", { class: "trace", id: `trace-${id}`, "data-trace-id": id },
      el("div", { class: "head" }, link,
        el("span", { text: `${((trace.duration_ns || 0) / 1e6).toFixed(1)} ms` }),
        el("span", { text: (trace.services || []).join(" → ") }),
        badge(`${trace.errors || 0} failed span${trace.errors === 1 ? "" : "s"}`, "bad"),
        el("span", { class: "note", text: trace.start_ns ? clock(trace.start_ns / 1e9) : "" })),
      waterfall(trace));
  }

  function linkedTraceId() {
    const m = /^#trace=([0-9a-fA-F]+)$/.exec(location.hash);
    return m ? m[1].toLowerCase() : null;
  }

  async function tracesLoop() {
    await loadTraces();
    setTimeout(tracesLoop, TRACES_EVERY);
  }

  async function loadTraces() {
    const note = document.getElementById("traces-note");
    try {
      const traces = traceList(await getJSON(`/api/v1/traces?errors=1&limit=${TRACES_SHOWN}`));
      const linked = linkedTraceId();
      if (linked && !traces.some((t) => t.trace_id === linked)) {
        // A linked trace that is not among the recent failures (older, or without errors): ask for it.
        const found = traceList(await getJSON(`/api/v1/traces?trace_id=${linked}&limit=200`))
          .filter((t) => t.trace_id.startsWith(linked));
        traces.unshift(...found.slice(0, 1));
      }
      const ids = traces.map((t) => t.trace_id).join(",");
      if (ids !== state.traceIds.join(",")) { // redraw only when the list changed: keep the reader's place
        state.traceIds = traces.map((t) => t.trace_id);
        document.getElementById("traces").replaceChildren(...(traces.length ? traces.map(traceCard)
          : [el("p", { class: "note", text: "no failed traces in the span log" })]));
        showLinkedTrace();
      }
      note.classList.remove("error-text");
    } catch (err) {
      note.classList.add("error-text");
      note.textContent = `traces unavailable: ${err.message}`;
    }
  }

  function showLinkedTrace() {
    const linked = linkedTraceId();
    for (const card of document.querySelectorAll(".trace.selected")) card.classList.remove("selected");
    if (!linked) return;
    const card = [...document.querySelectorAll(".trace")].find((c) => c.dataset.traceId.startsWith(linked));
    if (card) {
      card.classList.add("selected");
      card.scrollIntoView({ block: "start" });
    }
  }

  // -- start ----------------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("window").addEventListener("change", (ev) => {
      state.windowSeconds = Number(ev.target.value);
      loadMesh();
    });
    document.getElementById("reset-cancel").addEventListener("click", () => {
      state.pendingReset = null;
      document.getElementById("reset-dialog").close();
    });
    document.getElementById("reset-confirm").addEventListener("click", confirmReset);
    window.addEventListener("hashchange", () => {
      state.traceIds = []; // a newly linked trace may need fetching
      loadTraces();
    });
    meshLoop().then(() => { refreshHistory(); tracesLoop(); });
  });
})();
