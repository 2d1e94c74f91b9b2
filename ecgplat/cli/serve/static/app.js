// The ecgplat page: upload an ECG or pick a stored record; show its 12 leads, the prediction and
// its most similar stored ECGs with their traces. Plain JS against the service's own API.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "ecgplat-token";
const K = 8;
let health = null;

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

function friendly(status, message) {
  const why = message ? ` (${message})` : "";
  if (status === 401) return "This service needs an access key: paste it under \u201cAccess key\u201d above.";
  if (status === 403) return "Your access key does not allow this" + why + ".";
  if (status === 413) return "That upload is too large for this service" + why + ".";
  if (status === 415) return "That is not an ECG file this service can read" + why + ".";
  if (status === 429) return "Too many requests in a short time; wait a moment and try again.";
  if (status === 503) return "The service cannot answer this right now" + why + ".";
  return message || `The service answered with an error (${status}).`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : null;
  if (!response.ok) {
    if (response.status === 401) {
      $("token-box").hidden = false;
      $("token-box").open = true;
    }
    const error = new Error(friendly(response.status, body && body.error));
    error.status = response.status;
    throw error;
  }
  return body;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function keyPath(key) {
  return key.split("/").map(encodeURIComponent).join("/");
}

// 12 rows of polylines: each lead's first 5 s, +-1.5 mV filling its row
// `overlay` (optional): per lead, values in [-1, 1] at the trace's rate, drawn behind it as red
// (raised the finding) and blue (lowered it) bands
function drawTrace(container, trace, rowHeight, width = 1000, overlay = null) {
  const left = 46, rows = trace.mv.length, height = rows * rowHeight;
  const n = trace.mv[0].length, dx = (width - left - 4) / (n - 1), scale = rowHeight / 3;
  const parts = [`<svg viewBox="0 0 ${width} ${height}" role="img" aria-label="12-lead ECG">`];
  for (let lead = 0; lead < rows; lead++) {
    const mid = lead * rowHeight + rowHeight / 2;
    if (overlay) {
      const bin = 5;
      for (let i = 0; i < n; i += bin) {
        const part = overlay[lead].slice(i, i + bin);
        const v = part.reduce((a, b) => a + b, 0) / part.length;
        if (Math.abs(v) < 0.05) continue;
        const colour = v > 0 ? "214,39,40" : "31,119,180";
        parts.push(`<rect class="attribution" x="${(left + i * dx).toFixed(1)}" y="${lead * rowHeight}" ` +
          `width="${(bin * dx).toFixed(1)}" height="${rowHeight}" fill="rgba(${colour},${Math.min(0.8, Math.abs(v)).toFixed(2)})"/>`);
      }
    }
    parts.push(`<text x="2" y="${mid + 4}" font-size="${Math.min(14, rowHeight * 0.6)}" fill="#5b6875">${trace.leads[lead]}</text>`);
    if (!trace.lead_mask[lead]) {
      parts.push(`<text x="${left}" y="${mid + 4}" font-size="11" fill="#9aa5b1">not recorded</text>`);
      continue;
    }
    const points = trace.mv[lead].map((v, i) => {
      const y = mid - Math.max(-1.5, Math.min(1.5, v)) * scale;
      return `${(left + i * dx).toFixed(1)},${y.toFixed(1)}`;
    });
    parts.push(`<polyline class="lead" fill="none" stroke="#1d2733" stroke-width="1" points="${points.join(" ")}"/>`);
  }
  parts.push("</svg>");
  container.innerHTML = parts.join("");
}

function renderMatches(matches) {
  const box = $("matches");
  box.innerHTML = "";
  $("neighbours").hidden = false;
  $("neighbours").dataset.ready = "false";
  const loads = matches.map((m) => {
    const card = document.createElement("article");
    card.className = "match";
    card.dataset.key = m.key;
    card.dataset.score = String(m.score);
    card.dataset.rank = String(m.rank);
    const same = m.same_patient ? '<span class="badge">same patient</span>' : "";
    card.innerHTML = `<h3>#${m.rank} <span class="key"></span></h3>
      <div class="score">similarity ${m.score.toFixed(3)}${same}</div><div class="trace"></div>`;
    card.querySelector(".key").textContent = m.key;
    box.appendChild(card);
    const record = m.key.split("#")[0];
    return api(`/records/${keyPath(record)}/trace`)
      .then((trace) => drawTrace(card.querySelector(".trace"), trace, 22, 520))
      .catch((e) => { card.querySelector(".trace").textContent = e.message; });
  });
  return Promise.all(loads).then(() => { $("neighbours").dataset.ready = "true"; });
}

function renderPrediction(answer) {
  const task = answer.task, row = answer.prediction;
  const body = $("prediction-table").querySelector("tbody");
  body.innerHTML = "";
  $("prediction").hidden = false;
  if (row.error) {
    $("prediction-note").textContent = "No prediction: " + row.error;
    return;
  }
  const names = task.names || task.classes;
  const entries = task.classes.map((c, i) => {
    if (task.kind === "regression") return { name: names[i], value: row["value_" + c], called: null };
    const p = row["p_" + c];
    const called = task.kind === "multiclass" ? row.label === c : row["label_" + c] === 1;
    return { name: names[i], value: p, called };
  });
  if (task.kind !== "regression") entries.sort((a, b) => b.value - a.value);
  const shown = entries.slice(0, 12);
  $("prediction-note").textContent = task.kind === "regression"
    ? `Predicted values (${task.name}).`
    : `Probabilities for the ${entries.length} findings of task \u201c${task.name}\u201d, most likely first` +
      (entries.length > shown.length ? ` (top ${shown.length} shown)` : "") +
      "; \u201cCalled\u201d marks those above the model's own threshold.";
  for (const e of shown) {
    const tr = document.createElement("tr");
    tr.className = e.called ? "called" : "";
    tr.dataset.finding = e.name;
    if (task.kind === "regression") {
      tr.innerHTML = `<td></td><td class="value">${e.value.toFixed(2)}</td><td></td><td></td>`;
    } else {
      const pct = (100 * e.value).toFixed(1);
      tr.innerHTML = `<td></td><td class="value">${pct}%</td>
        <td class="bar"><span style="width:${pct}%"></span></td><td>${e.called ? "yes" : ""}</td>`;
    }
    tr.firstChild.textContent = e.name;
    if (health && health.explain) {
      tr.title = "Show which parts of the ECG drove this finding";
      tr.style.cursor = "pointer";
      tr.addEventListener("click", () => explainFinding(e.name));
    }
    body.appendChild(tr);
  }
  return shown.length ? shown[0].name : null;
}

let lastQuery = null; // {kind, input, trace}: what an explanation is drawn over

async function explainFinding(name) {
  if (!lastQuery || !health || !health.explain) return;
  const f = new FormData();
  if (lastQuery.kind === "upload") for (const file of lastQuery.input) f.append("files", file);
  else f.append("key", lastQuery.input);
  f.append("class", name);
  $("explain-note").textContent = `Working out which parts of the ECG drove \u201c${name}\u201d\u2026`;
  try {
    const e = await api("/explain", { method: "POST", body: f });
    drawTrace($("query-trace"), lastQuery.trace, 40, 1000, e.attribution);
    const share = Math.round(100 * e.lead_shares[e.top_lead]);
    $("explain-note").textContent = `Coloured bands: where the ECG raised (red) or lowered (blue) ` +
      `the model's score for \u201c${name}\u201d. Lead ${e.top_lead} contributed most (${share}%). ` +
      "Click another finding to see its bands.";
    $("query-trace").dataset.explained = name;
  } catch (err) {
    $("explain-note").textContent = err.message;
  }
}

function describeUpload(u) {
  return `Your upload: ${u.format} file of ${u.seconds} s (the first 5 s of ${u.segments} shown), ` +
    `leads ${u.leads.join(", ")}.`;
}

function describeRecord(m) {
  const who = [m.age != null ? `age ${m.age}` : null, m.sex ? `sex ${m.sex}` : null].filter(Boolean);
  const labels = m.labels.length ? `; recorded findings: ${m.labels.join(", ")}` : "";
  return `Stored record ${m.key} (${m.source}), ${m.seconds} s` + (who.length ? `, ${who.join(", ")}` : "") + labels + ".";
}

async function run(kind, input) {
  const buttons = document.querySelectorAll("button");
  buttons.forEach((b) => { b.disabled = true; });
  $("result").hidden = false;
  $("prediction").hidden = true;
  $("neighbours").hidden = true;
  $("neighbours").dataset.ready = "false";
  $("query-trace").innerHTML = "";
  try {
    setStatus(kind === "upload" ? "Reading your ECG and searching the store\u2026" : "Searching the store\u2026");
    const form = () => {
      const f = new FormData();
      if (kind === "upload") for (const file of input) f.append("files", file);
      else f.append("key", input);
      return f;
    };
    const queryForm = form();
    queryForm.append("k", String(K));
    if (kind === "upload") queryForm.append("trace", "true");
    const answer = await api("/query", { method: "POST", body: queryForm });
    let trace = answer.query.trace;
    if (kind === "upload") {
      $("query-info").textContent = describeUpload(answer.query.upload);
    } else {
      const [meta, stored] = await Promise.all([
        api(`/records/${keyPath(input)}`), api(`/records/${keyPath(input)}/trace`),
      ]);
      $("query-info").textContent = describeRecord(meta);
      trace = stored;
    }
    lastQuery = { kind, input, trace };
    drawTrace($("query-trace"), trace, 40);
    delete $("query-trace").dataset.explained;
    $("explain-note").textContent = "";
    const shown = renderMatches(answer.matches);
    if (health && health.predict) {
      try {
        const top = renderPrediction(await api("/predict", { method: "POST", body: form() }));
        if (top) explainFinding(top);
      } catch (e) {
        $("prediction").hidden = false;
        $("prediction-note").textContent = e.message;
      }
    }
    await shown;
    setStatus(`Found ${answer.matches.length} similar ECGs among ${answer.index.rows} stored.`);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

let pickTimer = null;
async function fillKeys(q) {
  try {
    const found = await api(`/records?limit=50&q=${encodeURIComponent(q)}`);
    $("record-keys").innerHTML = "";
    for (const key of found.keys) {
      const option = document.createElement("option");
      option.value = key;
      $("record-keys").appendChild(option);
    }
  } catch (e) { /* a token without the records scope: typing a key still works */ }
}

async function start() {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    fillKeys($("pick").value);
  });
  $("upload-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const files = $("files").files;
    if (!files.length) return setStatus("Choose the ECG's file(s) first.", true);
    run("upload", files);
  });
  $("pick-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("pick").value.trim();
    if (!key) return setStatus("Type or choose a record first.", true);
    run("record", key);
  });
  $("pick").addEventListener("input", () => {
    clearTimeout(pickTimer);
    pickTimer = setTimeout(() => fillKeys($("pick").value.trim()), 200);
  });
  try {
    health = await api("/health");
    $("token-box").hidden = !health.auth;
    $("service").textContent = health.index
      ? `Connected: ${health.index.rows} stored ECGs to compare with` +
        (health.predict ? ", and a prediction model." : ".")
      : `Connected, but similar-ECG search is unavailable: ${health.error || "no index loaded"}.`;
    document.body.dataset.ready = "true";
    fillKeys("");
  } catch (e) {
    $("service").textContent = "The service does not answer: " + e.message;
  }
}

start();
