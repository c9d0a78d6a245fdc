// The page of `cavmae serve`: send one clip to /v1/classify, /v1/localize and /v1/search and
// show the answers. No build step, no libraries: DOM calls and fetch.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;

function headers() {
  const key = $("key").value || sessionStorage.getItem("cavmae-key") || "";
  if ($("key").value) sessionStorage.setItem("cavmae-key", $("key").value);
  return key ? { Authorization: "Bearer " + key } : {};
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function call(path, file, fields) {
  const body = new FormData();
  body.append("file", file, file.name);
  for (const [k, v] of Object.entries(fields || {})) body.append(k, v);
  const response = await fetch(path, { method: "POST", body, headers: headers() });
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

async function loadModel() {
  const response = await fetch("/v1/model", { headers: headers() });
  if (response.status === 401) {
    $("key-row").hidden = false;
    $("model").textContent = "this server needs an API key";
    return;
  }
  model = await response.json();
  const index = model.index ? `, index of ${model.index.count} clips` : "";
  $("model").textContent = `${model.model || "model"}: ${model.kind}, ${model.num_classes} classes,`
    + ` ${model.precision}, ${model.engine}${index}`;
}

function showLabels(record) {
  const list = $("labels");
  list.replaceChildren();
  for (const t of record.top) {
    const li = document.createElement("li");
    li.className = "label";
    li.dataset.index = t.index;
    li.dataset.score = t.score;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = t.label;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = t.score.toFixed(3);
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${Math.max(1, 100 * t.score)}%`;  // a probability: the full width is 1
    li.append(name, score, bar);
    list.append(li);
  }
}

function showHeat(result) {
  const img = document.createElement("img");
  img.id = "heat-image";
  img.alt = `sound-source heat map over frame ${result.frame}`;
  img.src = result.image;
  $("heat").replaceChildren(img);
  $("heat-caption").textContent = `(frame ${result.frame}, t = ${result.frame_time.toFixed(2)} s)`;
  $("heat-panel").hidden = false;
}

function showNeighbours(result) {
  const table = document.createElement("table");
  table.id = "hits";
  table.innerHTML = "<tr><th>query &rarr; rows</th><th>#</th><th>clip</th><th>score</th></tr>";
  for (const list of result.results) {
    for (const hit of list.hits) {
      const row = table.insertRow();
      row.className = "hit";
      const cells = [`${list.query} \u2192 ${list.target}`, hit.rank, hit.path.split("/").pop(), hit.score.toFixed(4)];
      cells.forEach((text, i) => {
        const cell = row.insertCell();
        cell.textContent = text;
        if (i === 1 || i === 3) cell.className = "num";
      });
    }
  }
  $("neighbours").replaceChildren(table);
  $("search-panel").hidden = false;
}

async function analyse(file) {
  if (!model) await loadModel();
  if (!model) { status("enter the API key, then choose the file again", true); return; }
  status(`classifying ${file.name}\u2026`);
  $("heat-panel").hidden = true;
  $("search-panel").hidden = true;
  try {
    if (model.kind === "classifier") {
      showLabels(await call("/v1/classify", file, { top_k: 5 }));
    } else {
      $("labels").innerHTML = '<li class="muted">a pre-training model has no labels</li>';
    }
    const extra = [];
    if (model.localize) {
      extra.push(call("/v1/localize", file).then(showHeat).catch((e) => {
        $("heat").textContent = e.message;
        $("heat-panel").hidden = false;
      }));
    }
    if (model.index) extra.push(call("/v1/search", file, { k: 5 }).then(showNeighbours));
    await Promise.all(extra);
    status(`done: ${file.name}`);
    document.body.dataset.done = file.name;
  } catch (e) {
    status(e.message, true);
  }
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) analyse(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) analyse(e.dataTransfer.files[0]);
});
$("key").addEventListener("change", () => { model = null; loadModel(); });
loadModel().catch((e) => status(e.message, true));
