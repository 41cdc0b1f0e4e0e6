// The fedmeki dashboard: polls the coordinator's read-only JSON endpoints every second and redraws in place.
// Plain DOM and inline SVG; every value from the server is set as text, never parsed as HTML.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let selected = decodeURIComponent(location.hash.replace(/^#job=/, "")) || null;
let serverNow = Date.now();
let lastOk = 0;

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) {
    const error = new Error(body.error || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  serverNow = Date.parse(response.headers.get("Date")) || Date.now();
  return body;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function badge(state) {
  return el("span", state, `state ${state}`);
}

function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, Math.round((serverNow - Date.parse(iso)) / 1000));
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return new Date(iso).toLocaleString();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "…";
  return seconds < 90 ? `${seconds.toFixed(1)} s` : `${(seconds / 60).toFixed(1)} min`;
}

function fillRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function renderJobs(jobs) {
  if (!selected && jobs.length) {
    selected = (jobs.find((job) => job.state === "running") || jobs[0]).id;
  }
  fillRows(
    $("jobs").tBodies[0],
    jobs.map((job) => {
      const row = el("tr");
      row.dataset.job = job.id;
      if (job.id === selected) row.className = "selected";
      row.append(el("td", job.name), el("td"), el("td", `${job.current_round} / ${job.total_rounds}`));
      row.cells[1].append(badge(job.state));
      row.append(el("td", job.task), el("td", job.algorithm));
      row.addEventListener("click", () => {
        selected = job.id;
        location.hash = `job=${encodeURIComponent(job.id)}`;
        refresh();
      });
      return row;
    }),
  );
  $("no-jobs").hidden = jobs.length > 0;
}

function renderSilos(document_) {
  const silos = document_.silos;
  fillRows(
    $("silos").tBodies[0],
    silos.map((silo) => {
      const row = el("tr");
      const name = el("td");
      name.append(el("span", null, silo.connected ? "dot on" : "dot"), silo.name);
      if (silo.revoked) name.append(" (revoked)");
      row.append(name, el("td", silo.role), el("td", silo.device || "-"), el("td", ago(silo.last_seen_at)));
      return row;
    }),
  );
  $("no-silos").hidden = silos.length > 0;
}

function renderJob(job) {
  $("job").hidden = false;
  $("job-name").textContent = job.name;
  $("job-state").textContent = job.state;
  $("job-state").className = `state ${job.state}`;
  $("job-round").textContent = job.current_round;
  $("job-rounds").textContent = job.total_rounds;
  $("job-task").textContent = job.task;
  $("job-algorithm").textContent = job.algorithm;
  $("job-min-silos").textContent = job.min_silos;
  $("job-id").textContent = job.id;
  $("job-reason").textContent = job.reason;
  $("job-reason").hidden = !job.reason;
  const rounds = [...job.rounds, ...job.injections, ...job.evaluations].sort((a, b) => a.number - b.number);
  fillRows(
    $("rounds").tBodies[0],
    rounds.reverse().map((round) => {
      const row = el("tr");
      row.append(el("td", round.number), el("td", round.kind), el("td"));
      row.cells[2].append(badge(round.state));
      const selectedCount = round.selected_silos.length;
      row.append(
        el("td", selectedCount ? `${round.updates} / ${selectedCount}` : round.updates),
        el("td", round.opened_at ? new Date(round.opened_at).toLocaleTimeString() : "-"),
        el("td", duration(round.seconds)),
        el("td", round.reported_silos.join(", ") || "-"),
      );
      return row;
    }),
  );
}

// One chart per task: x is the checkpoint scored, y the task's headline metric.
function renderCurves(metrics, rounds) {
  const charts = metrics.tasks.map((task) => {
    const rows = metrics.rows.filter((row) => row.task === task.task && row.value !== null);
    const series = new Map();
    for (const row of rows) {
      const key =
        row.kind === "inject" ? "injected"
        : row.kind === "evaluator" ? `evaluator ${row.silo}`
        : row.silo === "all" ? "all"
        : `silo ${row.silo}`;
      if (!series.has(key)) series.set(key, []);
      series.get(key).push([row.checkpoint, row.value]);
    }
    return chart(task, series, rounds);
  });
  $("curves").replaceChildren(...charts);
}

function chart(task, series, rounds) {
  const width = 340, height = 190, left = 42, right = 10, top = 10, bottom = 26;
  const values = [...series.values()].flat();
  let low = Math.min(...values.map((p) => p[1]));
  let high = Math.max(...values.map((p) => p[1]));
  if (!values.length) [low, high] = [0, 1];
  if (high - low < 1e-9) [low, high] = [low - 0.5, high + 0.5];
  const pad = (high - low) * 0.08;
  [low, high] = [low - pad, high + pad];
  const lastX = Math.max(rounds, ...values.map((p) => p[0]), 1);
  const x = (v) => left + (v / lastX) * (width - left - right);
  const y = (v) => top + (1 - (v - low) / (high - low)) * (height - top - bottom);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("role", "img");
  const add = (tag, attributes, text) => {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  add("line", { class: "axis", x1: left, y1: height - bottom, x2: width - right, y2: height - bottom });
  add("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom });
  for (const v of [low + pad, high - pad]) {
    add("text", { class: "tick", x: left - 4, y: y(v) + 3, "text-anchor": "end" }, v.toFixed(3));
  }
  for (let c = 0; c <= lastX; c += Math.max(1, Math.ceil(lastX / 8))) {
    add("text", { class: "tick", x: x(c), y: height - bottom + 13, "text-anchor": "middle" }, c);
  }
  add("text", { class: "tick", x: width - right, y: height - 2, "text-anchor": "end" }, "checkpoint");
  const order = [...series.keys()].sort((a, b) => (a === "all") - (b === "all"));
  for (const key of order) {
    const points = series.get(key).sort((a, b) => a[0] - b[0]);
    const kind = key === "all" ? "all" : key === "injected" ? "injected" : "silo";
    const path = add("path", {
      class: kind,
      d: points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "),
    });
    path.dataset.series = key;
    path.dataset.points = points.length;
    if (kind !== "silo") {
      for (const p of points) add("circle", { class: kind, cx: x(p[0]), cy: y(p[1]), r: 3 });
    }
  }
  const figure = el("figure", null, "curve");
  figure.dataset.task = task.task;
  const caption = el("figcaption");
  caption.append(el("strong", task.task), ` · ${task.metric} · ${task.modality}`);
  figure.append(caption, svg);
  return figure;
}

function showError(message) {
  $("banner").textContent = message;
  $("banner").hidden = !message;
}

async function refresh() {
  try {
    const [jobs, silos] = await Promise.all([getJson("/api/jobs"), getJson("/api/silos")]);
    renderJobs(jobs.jobs);
    renderSilos(silos);
    if (selected) {
      const id = encodeURIComponent(selected);
      try {
        const [job, metrics] = await Promise.all([getJson(`/api/jobs/${id}`), getJson(`/api/jobs/${id}/metrics`)]);
        renderJob(job);
        renderCurves(metrics, job.total_rounds);
      } catch (error) {
        if (error.status !== 404) throw error;
        selected = null; // a stale link: show the newest job at the next poll
        $("job").hidden = true;
        history.replaceState(null, "", location.pathname);
      }
    }
    showError("");
    lastOk = Date.now();
  } catch (error) {
    showError(`The coordinator did not answer: ${error.message}`);
  }
  const live = $("live");
  live.textContent = lastOk ? `updated ${new Date(lastOk).toLocaleTimeString()}` : "not connected";
  live.className = Date.now() - lastOk > 5 * POLL_MS ? "live stale" : "live";
}

async function poll() {
  await refresh();
  setTimeout(poll, POLL_MS);
}

poll();
