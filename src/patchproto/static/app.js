// The PatchProto page: classify a dropped image and edit the model's defect types.
// Plain browser JavaScript, no build step and no network access beyond this server.
"use strict";

const state = { file: null, types: [] };

const $ = (id) => document.getElementById(id);

function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showStatus(message) {
  $("status").textContent = message;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// The server answers errors as {"detail": "..."}; anything else becomes a generic message.
async function request(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (error) {
    throw new Error(`The server did not answer (${error.message}). Is it still running?`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    let detail = body && body.detail;
    if (Array.isArray(detail)) detail = detail.map((item) => item.msg).join("; ");
    throw new Error(detail || `The server answered ${response.status} ${response.statusText}.`);
  }
  return body;
}

function formatNumber(value, digits = 3) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "n/a";
}

function percent(value) {
  return typeof value === "number" && Number.isFinite(value) ? `${(value * 100).toFixed(1)}%` : "n/a";
}

// ----- classification -------------------------------------------------------------------

async function classify(file) {
  state.file = file;
  showError("");
  showStatus(`Classifying ${file.name}…`);
  $("result").hidden = true;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const result = await request("/api/classify", { method: "POST", body: form });
    renderResult(result, file);
    showStatus(`Classified ${file.name}.`);
  } catch (error) {
    showStatus("");
    showError(error.message);
  }
}

function renderRanking(ranking, predicted) {
  const list = $("ranking");
  list.replaceChildren();
  for (const entry of ranking) {
    const confidence = entry.confidence;
    const fill = element("div", { class: "bar-fill" });
    fill.style.width = `${Math.max(0, Math.min(1, confidence || 0)) * 100}%`;
    const bar = element(
      "div",
      {
        class: "bar",
        role: "meter",
        "aria-valuemin": "0",
        "aria-valuemax": "100",
        "aria-valuenow": String(Math.round((confidence || 0) * 100)),
        "aria-label": `Confidence for ${entry.type}`,
      },
      [fill],
    );
    const item = element("li", { class: entry.type === predicted ? "rank top" : "rank" }, [
      element("span", { class: "rank-name", text: entry.type }),
      bar,
      element("span", {
        class: "rank-numbers",
        text: `${percent(confidence)} · distance ${formatNumber(entry.distance)}`,
      }),
    ]);
    list.append(item);
  }
}

function renderAnomaly(score, threshold, anomalous) {
  // The bar spans 0 to twice the threshold (or the score, if larger), so the mark sits mid-way.
  const top = Math.max(threshold * 2, score, 1e-9);
  const fill = $("score-fill");
  fill.style.width = `${Math.max(0, Math.min(1, score / top)) * 100}%`;
  fill.classList.toggle("over", Boolean(anomalous));
  $("threshold-mark").style.left = `${Math.max(0, Math.min(1, threshold / top)) * 100}%`;
  const verdict = anomalous ? "above the threshold: anomalous" : "below the threshold: looks normal";
  $("anomaly-text").textContent =
    `Score ${formatNumber(score)} against threshold ${formatNumber(threshold)}, ${verdict}.`;
}

function renderPatches(patches) {
  const list = $("patches");
  list.replaceChildren();
  $("patch-count").textContent = String(patches.length);
  for (const patch of patches) {
    const box = patch.box || patch;
    const [x0, y0, x1, y1] = Array.isArray(box) ? box : [box.x0, box.y0, box.x1, box.y1];
    let text = `x ${Math.round(x0)}–${Math.round(x1)}, y ${Math.round(y0)}–${Math.round(y1)}`;
    if (typeof patch.score === "number") text += `, anomaly ${formatNumber(patch.score)}`;
    if (typeof patch.weight === "number") text += `, weight ${formatNumber(patch.weight)}`;
    if (patch.support_example) {
      text += `; nearest: ${patch.support_example} (${patch.support_type}),`;
      text += ` distance ${formatNumber(patch.distance)}`;
    }
    list.append(element("li", { text }));
  }
}

function renderResult(result, file) {
  const ranking = result.ranking || [];
  const predicted = result.predicted_type ?? (ranking[0] && ranking[0].type) ?? "unknown";
  $("result-name").textContent = file.name;
  $("predicted-type").textContent = predicted;
  renderRanking(ranking, predicted);
  renderAnomaly(result.anomaly_score, result.threshold, result.is_anomalous);
  renderPatches(result.deciding_patches || []);

  const overlay = $("overlay");
  if (result.overlay) {
    overlay.src = result.overlay;
    overlay.alt = `Anomaly heatmap over ${file.name}, deciding patches outlined`;
    overlay.hidden = false;
  } else {
    overlay.removeAttribute("src");
    overlay.hidden = true;
  }
  if (!$("add-type").value) $("add-type").value = predicted;
  $("result").hidden = false;
}

// ----- defect types ---------------------------------------------------------------------

async function loadTypes() {
  try {
    const body = await request("/api/types");
    renderTypes(body.types);
  } catch (error) {
    showError(error.message);
  }
}

function exampleUrl(type, name) {
  return `/api/types/${encodeURIComponent(type)}/examples/${encodeURIComponent(name)}`;
}

function renderTypes(types) {
  state.types = types;
  const names = $("type-names");
  names.replaceChildren(...types.map((type) => element("option", { value: type.name })));

  const container = $("types");
  container.replaceChildren();
  if (types.length === 0) {
    container.append(element("p", { class: "muted", text: "No defect types yet." }));
  }
  for (const type of types) {
    const headingId = `type-${type.name.replace(/[^A-Za-z0-9_-]/g, "_")}`;
    const addHere = element("button", {
      type: "button",
      class: "button small-button",
      text: "Add current image here",
      "aria-label": `Add the current image as an example of ${type.name}`,
    });
    addHere.disabled = !state.file;
    addHere.addEventListener("click", () => addExample(type.name));

    const list = element("ul", { class: "examples", "aria-labelledby": headingId });
    for (const example of type.examples) {
      const remove = element("button", {
        type: "button",
        class: "remove",
        text: "Remove",
        "aria-label": `Remove example ${example.name} of ${type.name}`,
      });
      remove.addEventListener("click", () => removeExample(type.name, example.name));
      const image = element("img", {
        src: `${example.url}?thumbnail=160`,
        alt: `Example ${example.name} of ${type.name}`,
        loading: "lazy",
        width: "80",
        height: "80",
      });
      list.append(
        element("li", { class: "example" }, [
          image,
          element("span", { class: "example-name small", text: example.name, title: example.name }),
          remove,
        ]),
      );
    }
    const count = `${type.examples.length} example${type.examples.length === 1 ? "" : "s"}`;
    container.append(
      element("article", { class: "type", "data-type": type.name }, [
        element("div", { class: "type-head" }, [
          element("h3", { id: headingId }, [
            type.name,
            element("span", { class: "muted small", text: ` (${count})` }),
          ]),
          addHere,
        ]),
        list,
      ]),
    );
  }
}

async function addExample(typeName) {
  if (!state.file) {
    showError("Classify an image first; that image is the one added as an example.");
    return;
  }
  showError("");
  showStatus(`Adding ${state.file.name} to ${typeName}…`);
  const form = new FormData();
  form.append("files", state.file, state.file.name);
  try {
    const body = await request(`/api/types/${encodeURIComponent(typeName)}/examples`, {
      method: "POST",
      body: form,
    });
    renderTypes(body.types);
    showStatus(`Added ${body.added.join(", ")} as an example of ${typeName}.`);
    refreshHealth();
  } catch (error) {
    showStatus("");
    showError(error.message);
  }
}

async function removeExample(typeName, exampleName) {
  showError("");
  showStatus(`Removing ${exampleName} from ${typeName}…`);
  try {
    const body = await request(exampleUrl(typeName, exampleName), { method: "DELETE" });
    renderTypes(body.types);
    showStatus(`Removed ${exampleName} from ${typeName}.`);
    refreshHealth();
  } catch (error) {
    showStatus("");
    showError(error.message);
  }
}

async function refreshHealth() {
  try {
    const health = await request("/api/health");
    $("model-info").textContent =
      `Model ${health.model}: ${health.types} types, ${health.examples} examples.`;
  } catch (error) {
    $("model-info").textContent = error.message;
  }
}

// ----- wiring ---------------------------------------------------------------------------

function setUp() {
  const input = $("file-input");
  input.addEventListener("change", () => {
    if (input.files.length > 0) classify(input.files[0]).then(() => renderTypes(state.types));
    input.value = "";
  });

  // A file dropped beside the zone must not make the browser navigate away to it.
  for (const name of ["dragover", "drop"]) {
    window.addEventListener(name, (event) => event.preventDefault());
  }
  const zone = $("drop-zone");
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length > 0) classify(files[0]).then(() => renderTypes(state.types));
  });

  $("add-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("add-type").value.trim();
    if (name) addExample(name);
  });

  refreshHealth();
  loadTypes();
}

document.addEventListener("DOMContentLoaded", setUp);
