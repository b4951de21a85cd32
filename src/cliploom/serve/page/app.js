// cliploom's page: the same /v1 API any client uses, with the token kept in this tab's session storage.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = {
  token: sessionStorage.getItem("cliploom-token") || "",
  models: [], loras: [], selected: null, shown: new Set(), stream: null, renderedReference: null,
};

// -- the API ---------------------------------------------------------------------------------------
async function askToken() {
  const dialog = $("#token-dialog");
  $("#token-input").value = state.token;
  dialog.showModal();
  await new Promise((resolve) => dialog.addEventListener("close", resolve, { once: true }));
  if (dialog.returnValue === "ok") {
    state.token = $("#token-input").value.trim();
    sessionStorage.setItem("cliploom-token", state.token);
    return true;
  }
  return false;
}

async function request(path, options = {}, retry = true) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401 && retry && (await askToken())) return request(path, options, false);
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}
const getJSON = async (path, options) => (await request(path, options)).json();
const blobURL = async (path) => URL.createObjectURL(await (await request(path)).blob());

// -- composing a story -----------------------------------------------------------------------------
function addClip(prompt = "", repeat = 1) {
  const row = $("#clip-row").content.firstElementChild.cloneNode(true);
  row.querySelector(".prompt").value = prompt;
  row.querySelector(".repeat").value = repeat;
  row.querySelector(".remove").onclick = () => { if ($("#clips").children.length > 1) row.remove(); };
  row.querySelector(".up").onclick = () => row.previousElementSibling && row.parentNode.insertBefore(row, row.previousElementSibling);
  row.querySelector(".down").onclick = () => row.nextElementSibling && row.parentNode.insertBefore(row.nextElementSibling, row);
  const end = row.querySelector(".end-file"), thumb = row.querySelector(".end-thumb"), clear = row.querySelector(".end-clear");
  const showEnd = () => {
    const file = end.files[0];
    thumb.hidden = clear.hidden = !file;
    row.querySelector(".end-text").hidden = !!file;
    if (file) thumb.src = URL.createObjectURL(file);
  };
  end.onchange = showEnd;
  clear.onclick = () => { end.value = ""; showEnd(); };
  $("#clips").appendChild(row);
  return row;
}

function rowsOfForm() {
  return [...$("#clips").children].map((row) => ({
    prompt: row.querySelector(".prompt").value.trim(),
    repeat: Math.max(1, parseInt(row.querySelector(".repeat").value || "1", 10)),
    end: row.querySelector(".end-file").files[0] || null,
  })).filter((c) => c.prompt);
}

const clipsOfForm = () => rowsOfForm().map(({ prompt, repeat }) => ({ prompt, repeat }));

// end_frame[N] uploads: a row's end frame ends its last clip (N counts clips from 0, as the report does)
function endFramesOfForm() {
  let clip = -1;
  return rowsOfForm().flatMap((row) => { clip += row.repeat; return row.end ? [[clip, row.end]] : []; });
}

const currentModel = () => state.models.find((m) => m.id === $("#model").value) || state.models[0];

function modelChanged() {
  const model = currentModel();
  if (!model) return;
  $("#render-reference").hidden = !model.builtin;
  $("#frames").placeholder = model.frames + " (model default)";
  $("#steps").placeholder = model.steps + " (model default)";
  $("#reference-note").textContent = model.builtin
    ? "Upload an image, or render the built-in world's first frame for your first prompt."
    : "Upload the image the video starts from.";
}

async function renderReference() {
  const first = clipsOfForm()[0];
  if (!first) { $("#compose-error").textContent = "Write a first prompt to render its reference."; return; }
  const size = currentModel().width;
  const response = await request(`/v1/shapesworld/reference?size=${size}&prompt=${encodeURIComponent(first.prompt)}`);
  state.renderedReference = await response.blob();
  $("#reference-file").value = "";
  showPreview(URL.createObjectURL(state.renderedReference));
}

function showPreview(url) {
  const img = $("#reference-preview");
  img.src = url;
  img.hidden = false;
}

async function submitStory(event) {
  event.preventDefault();
  $("#compose-error").textContent = "";
  const clips = clipsOfForm();
  if (!clips.length) { $("#compose-error").textContent = "Give at least one clip a prompt."; return; }
  const story = { mode: $("#mode").value, seed: parseInt($("#seed").value || "0", 10), clips };
  if ($("#frames").value) story.frames = parseInt($("#frames").value, 10);
  if ($("#steps").value) story.steps = parseInt($("#steps").value, 10);
  const loras = [...document.querySelectorAll(".lora")].filter((l) => l.querySelector("input[type=checkbox]").checked)
    .map((l) => ({ name: l.dataset.name, weight: parseFloat(l.querySelector("input[type=number]").value || "1") }));
  if (loras.length) story.loras = loras;
  const form = new FormData();
  form.append("prompt", clips[0].prompt);
  form.append("model", $("#model").value);
  form.append("story", JSON.stringify(story));
  const file = $("#reference-file").files[0];
  if (file) form.append("input_reference", file);
  else if (state.renderedReference) form.append("input_reference", state.renderedReference, "reference.png");
  for (const [n, image] of endFramesOfForm()) form.append(`end_frame[${n}]`, image);
  $("#submit").disabled = true;
  try {
    const video = await getJSON("/v1/videos", { method: "POST", body: form });
    await refreshJobs();
    select(video.id);
  } catch (e) {
    $("#compose-error").textContent = e.message;
  } finally {
    $("#submit").disabled = false;
  }
}

// -- the job list ------------------------------------------------------------------------------------
async function refreshJobs() {
  let page;
  try { page = await getJSON("/v1/videos?limit=50"); } catch (e) { return; }
  const body = $("#jobs tbody");
  body.replaceChildren();
  $("#jobs-empty").hidden = page.data.length > 0;
  for (const v of page.data) {
    const row = document.createElement("tr");
    row.dataset.id = v.id;
    if (v.id === state.selected) row.classList.add("selected");
    row.innerHTML = `<td class="prompt"></td><td><span class="status ${v.status}">${v.status.replace("_", " ")}</span></td>
      <td><div class="progress"><div style="width:${v.progress}%"></div></div>
      <span class="small muted">${v.clips_done}/${v.clips_total} clips</span></td><td class="buttons"></td>`;
    row.querySelector(".prompt").textContent = v.prompt;
    row.querySelector(".prompt").title = v.id;
    row.querySelector(".prompt").onclick = () => select(v.id);
    const buttons = row.querySelector(".buttons");
    const view = document.createElement("button");
    view.className = "ghost"; view.textContent = "View"; view.onclick = () => select(v.id);
    const remove = document.createElement("button");
    remove.className = "danger";
    remove.textContent = v.status === "queued" || v.status === "in_progress" ? "Cancel" : "Delete";
    remove.onclick = () => removeVideo(v.id);
    buttons.append(view, remove);
    body.appendChild(row);
    if (v.id === state.selected) showStatus(v);
  }
}

async function removeVideo(id) {
  await request(`/v1/videos/${id}`, { method: "DELETE" });
  if (state.selected === id) { state.selected = null; stopStream(); $("#viewer").hidden = true; }
  await refreshJobs();
}

// -- the viewer ------------------------------------------------------------------------------------
function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
}

async function select(id) {
  stopStream();
  state.selected = id;
  state.shown = new Set();
  $("#viewer").hidden = false;
  $("#clip-grid").replaceChildren();
  $("#final-box").hidden = true;
  $("#eval-box").hidden = true;
  $("#extend-form").hidden = true;
  $("#viewer-bar").parentNode.classList.add("reset");
  $("#viewer-bar").style.width = "0%";
  requestAnimationFrame(() => $("#viewer-bar").parentNode.classList.remove("reset"));
  document.querySelectorAll("#jobs tr").forEach((r) => r.classList.toggle("selected", r.dataset.id === id));
  const video = await getJSON(`/v1/videos/${id}`);
  $("#viewer-title").textContent = video.prompt;
  for (let i = 0; i < video.clips_total; i++) pendingCell(i);
  for (let i = 0; i < video.clips_done; i++) showClip(id, i);
  showStatus(video);
  if (video.status === "completed") return showFinal(video);
  if (video.status !== "failed") followEvents(id);
}

function showStatus(v) {
  const text = v.status === "failed" ? `failed: ${v.error && v.error.message}`
    : v.status === "queued" ? `queued${v.queue_position ? ` (${v.queue_position} ahead)` : ""}`
    : `${v.status.replace("_", " ")} · ${v.clips_done}/${v.clips_total} clips · ${v.seconds} s · ${v.size}`;
  $("#viewer-status").textContent = text;
  $("#viewer-bar").style.width = v.progress + "%";
}

function pendingCell(i) {
  const cell = document.createElement("div");
  cell.className = "clip-cell";
  cell.id = `clip-${i}`;
  cell.innerHTML = `<div class="pending">clip ${i}</div><span>clip ${i}</span>`;
  $("#clip-grid").appendChild(cell);
}

async function showClip(id, i) {
  if (state.shown.has(i) || id !== state.selected) return;
  state.shown.add(i);
  const url = await blobURL(`/v1/videos/${id}/clips/${i}`);
  if (id !== state.selected) return;
  const video = document.createElement("video");
  Object.assign(video, { src: url, muted: true, loop: true, autoplay: true, playsInline: true });
  video.className = "clip-video";
  let cell = $(`#clip-${i}`);
  if (!cell) { pendingCell(i); cell = $(`#clip-${i}`); }
  cell.firstElementChild.replaceWith(video);
  video.play().catch(() => {});
}

async function showFinal(v) {
  const id = v.id;
  const url = await blobURL(`/v1/videos/${id}/content`);
  if (id !== state.selected) return;
  const final = $("#final");
  final.src = url;
  final.play().catch(() => {});
  $("#download").href = url;
  $("#download").download = `${id}.mp4`;
  $("#final-box").hidden = false;
  $("#extend-form").hidden = false;
  const model = state.models.find((m) => m.id === v.model);
  if (model && model.builtin) {
    try {
      $("#eval-contact").src = await blobURL(`/v1/videos/${id}/content?variant=eval_contact`);
      $("#eval-metrics").src = await blobURL(`/v1/videos/${id}/content?variant=eval_metrics`);
      $("#eval-box").hidden = false;
    } catch (e) { /* no evaluation for this video */ }
  }
}

// Server-sent events through fetch (EventSource cannot send the token).
async function followEvents(id) {
  const controller = new AbortController();
  state.stream = controller;
  let response;
  try { response = await request(`/v1/videos/${id}/events`, { signal: controller.signal }); } catch (e) { return; }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data) await onEvent(id, JSON.parse(data));
      }
    }
  } catch (e) { /* aborted */ }
}

async function onEvent(id, event) {
  if (id !== state.selected) return;
  if (event.type === "clip_done") showClip(id, event.clip);
  if (["step", "clip_done", "started", "completed", "failed"].includes(event.type)) {
    const video = await getJSON(`/v1/videos/${id}`);
    showStatus(video);
    if (event.type === "completed") showFinal(video);
  }
  if (event.type === "deleted") $("#viewer").hidden = true;
}

async function extendVideo(event) {
  event.preventDefault();
  $("#extend-error").textContent = "";
  const prompts = $("#extend-prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
  if (!prompts.length) { $("#extend-error").textContent = "Write at least one prompt."; return; }
  try {
    const video = await getJSON("/v1/videos/extensions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ video: { id: state.selected }, prompt: prompts[0], prompts }),
    });
    $("#extend-prompts").value = "";
    await refreshJobs();
    select(video.id);
  } catch (e) {
    $("#extend-error").textContent = e.message;
  }
}

// -- start -----------------------------------------------------------------------------------------
async function start() {
  $("#token-button").onclick = askToken;
  $("#add-clip").onclick = () => addClip().querySelector(".prompt").focus();
  $("#model").onchange = modelChanged;
  $("#render-reference").onclick = () => renderReference().catch((e) => { $("#compose-error").textContent = e.message; });
  $("#reference-file").onchange = () => {
    const file = $("#reference-file").files[0];
    state.renderedReference = null;
    if (file) showPreview(URL.createObjectURL(file));
  };
  $("#story-form").onsubmit = submitStory;
  $("#extend-form").onsubmit = extendVideo;
  try {
    state.models = (await getJSON("/v1/models")).data;
    state.loras = (await getJSON("/v1/loras")).data;
  } catch (e) {
    $("#compose-error").textContent = e.message;
    return;
  }
  for (const m of state.models) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = `${m.id} (${m.width}x${m.height}, ${m.fps} fps)`;
    $("#model").appendChild(option);
  }
  $("#server").textContent = `${state.models.length} model(s)`;
  $("#lora-box").hidden = state.loras.length === 0;
  for (const l of state.loras) {
    const row = document.createElement("label");
    row.className = "lora"; row.dataset.name = l.id;
    row.innerHTML = `<span><input type="checkbox"> ${l.id}</span><input type="number" step="0.05" value="1.0">`;
    $("#loras").appendChild(row);
  }
  addClip(currentModel() && currentModel().builtin ? "a big red circle moves right on a navy background" : "");
  modelChanged();
  await refreshJobs();
  setInterval(refreshJobs, 1500);
}

start();
