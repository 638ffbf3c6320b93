// The isekai page: upload or pick a photo, click the person (the mask shows after every click), pick a character,
// Generate with live progress from isekai_stream, compare before and after, download. Talks only to this host.
"use strict";

const STAGES = {  // isekai_stream's stages (the isekai ensemble's steps) in words
  queued: "Waiting for the server",
  preprocess: "Reading the photo",
  sam_decoder: "Finding the person",
  prepare: "Cutting out the person",
  lama: "Painting the background",
  diffusion: "Drawing the character",
  compose: "Putting the character in the scene",
  finish: "Finishing",
  done: "Done",
  cancelled: "Cancelled",
};
const $ = (id) => document.getElementById(id);
const state = {
  session: null, config: null, photo: null, image: null, clicks: [], box: null, mask: null,
  encoded: false, queue: Promise.resolve(), generating: null, drag: null,
};

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(`/api/${path}`, options);
  } catch (err) {
    throw new Error("The page's server cannot be reached. Is `isekai web` still running?");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (err) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}
const json = (body) => ({ method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

async function start() {
  try {
    state.session = (await (await api("session", { method: "POST" })).json()).session;
  } catch (err) { showError(err.message); return; }
  try {
    state.config = await (await api("config")).json();
  } catch (err) { showError(err.message); }
  const config = state.config;
  if (config) {
    $("server").textContent = `Server: ${config.server}`;
    fillOptions(config);
    for (const sample of config.samples) {
      const button = document.createElement("button");
      button.type = "button";
      button.title = sample.caption;
      button.dataset.sample = sample.name;
      button.innerHTML = `<img src="/api/samples/${sample.name}.png" alt="${sample.caption}">`;
      button.addEventListener("click", () => usePhoto(api(`s/${state.session}/sample/${sample.name}`, { method: "POST" })));
      $("samples").appendChild(button);
    }
  }
}

function fillOptions(config) {
  const select = $("character");
  for (const c of config.characters) {
    const option = document.createElement("option");
    option.value = c.name;
    option.textContent = c.default ? `${c.name} (default)` : c.name;
    option.disabled = Boolean(c.problem);
    option.selected = c.default;
    option.dataset.prompt = c.problem ? `cannot be drawn: ${c.problem}` : `${c.kind}: ${c.prompt}`;
    select.appendChild(option);
  }
  const showPrompt = () => { $("character-prompt").textContent = select.selectedOptions[0]?.dataset.prompt || ""; };
  select.addEventListener("change", showPrompt);
  showPrompt();
  const [stepsMin, stepsMax, steps] = config.limits.steps;
  Object.assign($("steps"), { min: stepsMin, max: stepsMax, value: steps });
  const [strengthMin, strengthMax, strength] = config.limits.strength;
  Object.assign($("strength"), { min: strengthMin, max: strengthMax, value: strength });
  const [seedMin, seedMax, seed] = config.limits.seed;
  Object.assign($("seed"), { min: seedMin, max: seedMax, value: seed });
  for (const factor of config.limits.upscale) {
    const option = document.createElement("option");
    option.value = factor;
    option.textContent = factor === 1 ? "off" : `${factor}x (Real-ESRGAN)`;
    $("upscale").appendChild(option);
  }
}

// --- the photo --------------------------------------------------------------------------------------------------
async function uploadFile(file) {
  if (!file) return;
  const limit = state.config?.limits.image_bytes;
  if (limit && file.size > limit) {
    showError(`This file is too big: ${(file.size / 2 ** 20).toFixed(1)} MiB; the limit is ${limit / 2 ** 20} MiB.`);
    return;
  }
  await usePhoto(api(`s/${state.session}/photo`, {
    method: "POST", body: file,
    headers: { "Content-Type": file.type || "application/octet-stream", "X-File-Name": encodeURIComponent(file.name) },
  }));
}

async function usePhoto(request) {
  showError("");
  cancelGenerate();
  try {
    state.photo = await (await request).json();
  } catch (err) { showError(err.message); return; }
  const image = new Image();
  image.onload = () => {
    state.image = image;
    state.clicks = []; state.box = null; state.mask = null; state.encoded = false;
    const canvas = $("photo-canvas");
    canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
    canvas.dataset.masks = "0"; canvas.dataset.maskHash = "";
    canvas.dataset.photo = `${state.photo.name} ${image.naturalWidth}x${image.naturalHeight}`;
    $("drop-zone").hidden = true; $("editor").hidden = false; $("result-panel").hidden = true;
    $("generate").disabled = true;
    $("segment-status").textContent = "Click the person. The first click prepares the photo (SAM reads it once).";
    draw();
  };
  image.onerror = () => showError("The photo could not be shown.");
  image.src = `/api/s/${state.session}/photo.png?t=${Date.now()}`;
}

function draw() {
  const canvas = $("photo-canvas");
  const ctx = canvas.getContext("2d");
  ctx.drawImage(state.image, 0, 0);
  if (state.mask) ctx.drawImage(state.mask, 0, 0);
  const r = Math.max(4, Math.round(Math.max(canvas.width, canvas.height) / 120));
  for (const c of state.clicks) {
    ctx.beginPath();
    ctx.arc(c.x, c.y, r, 0, 2 * Math.PI);
    ctx.fillStyle = c.positive ? "#2fb344" : "#d63939";
    ctx.fill();
    ctx.lineWidth = Math.max(1, r / 3); ctx.strokeStyle = "#fff"; ctx.stroke();
  }
  const box = state.drag?.box || state.box;
  if (box) {
    ctx.lineWidth = Math.max(2, r / 2); ctx.strokeStyle = "#4263eb";
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  }
}

// The server's mask PNG (255 = the person) as a tinted, half-transparent layer.
async function maskLayer(base64) {
  const bytes = Uint8Array.from(atob(base64), (ch) => ch.charCodeAt(0));
  const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }));
  const layer = document.createElement("canvas");
  layer.width = bitmap.width; layer.height = bitmap.height;
  const ctx = layer.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const pixels = ctx.getImageData(0, 0, layer.width, layer.height);
  let inside = 0;
  for (let i = 0; i < pixels.data.length; i += 4) {
    const on = pixels.data[i] > 127;
    inside += on;
    pixels.data[i] = 214; pixels.data[i + 1] = 51; pixels.data[i + 2] = 108; pixels.data[i + 3] = on ? 120 : 0;
  }
  ctx.putImageData(pixels, 0, 0);
  return { layer, fraction: inside / (layer.width * layer.height) };
}

function hash(text) {  // for the tests: tells two masks apart
  let h = 0;
  for (let i = 0; i < text.length; i++) h = (h * 31 + text.charCodeAt(i)) | 0;
  return (h >>> 0).toString(16);
}

function photoPoint(event) {
  const canvas = $("photo-canvas");
  const rect = canvas.getBoundingClientRect();
  return {
    x: Math.min(canvas.width, Math.max(0, (event.clientX - rect.left) * canvas.width / rect.width)),
    y: Math.min(canvas.height, Math.max(0, (event.clientY - rect.top) * canvas.height / rect.height)),
  };
}

function segment(path, body) {  // one at a time, in click order
  const status = $("segment-status");
  status.textContent = state.encoded ? "Finding the person..." :
    "Preparing the photo: SAM reads it once, then every click costs only its decoder...";
  state.queue = state.queue.then(async () => {
    try {
      const answer = await (await api(`s/${state.session}/${path}`, json(body))).json();
      const { layer, fraction } = await maskLayer(answer.mask);
      state.mask = layer; state.encoded = true;
      const canvas = $("photo-canvas");
      canvas.dataset.masks = String(Number(canvas.dataset.masks) + 1);
      canvas.dataset.maskHash = hash(answer.mask);
      canvas.dataset.maskFraction = fraction.toFixed(4);
      status.textContent = `Mask: ${(fraction * 100).toFixed(1)}% of the photo, score ${answer.score.toFixed(2)}, ` +
        `${answer.ms.toFixed(0)} ms.`;
      $("generate").disabled = false;
      showError("");
      draw();
    } catch (err) {
      showError(err.message);
      status.textContent = "";
    }
  });
  return state.queue;
}

function click(event, positive) {
  const p = photoPoint(event);
  state.clicks.push({ ...p, positive });
  draw();
  segment("click", { x: p.x, y: p.y, positive });
}

function setupEditor() {
  const canvas = $("photo-canvas");
  const mode = () => document.querySelector("input[name=mode]:checked").value;
  canvas.addEventListener("contextmenu", (event) => { event.preventDefault(); click(event, false); });
  canvas.addEventListener("mousedown", (event) => {
    if (event.button !== 0 || mode() !== "box") return;
    const p = photoPoint(event);
    state.drag = { start: p, box: [p.x, p.y, p.x, p.y] };
  });
  canvas.addEventListener("mousemove", (event) => {
    if (!state.drag) return;
    const p = photoPoint(event), s = state.drag.start;
    state.drag.box = [Math.min(s.x, p.x), Math.min(s.y, p.y), Math.max(s.x, p.x), Math.max(s.y, p.y)];
    draw();
  });
  canvas.addEventListener("mouseup", (event) => {
    if (event.button !== 0) return;
    if (state.drag) {
      const box = state.drag.box;
      state.drag = null;
      if (box[2] - box[0] > 3 && box[3] - box[1] > 3) {
        state.box = box;
        segment("box", { box });
      }
      draw();
      return;
    }
    click(event, mode() === "positive");
  });
  $("clear").addEventListener("click", async () => {
    state.clicks = []; state.box = null; state.mask = null;
    $("generate").disabled = true;
    $("segment-status").textContent = "Click the person.";
    draw();
    try { await api(`s/${state.session}/clear`, { method: "POST" }); } catch (err) { showError(err.message); }
  });
  $("new-photo").addEventListener("click", () => { $("drop-zone").hidden = false; $("editor").hidden = true; });
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (event) => { uploadFile(event.target.files[0]); event.target.value = ""; });
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    uploadFile(event.dataTransfer.files[0]);
  });
}

// --- Generate ---------------------------------------------------------------------------------------------------
function setProgress(stage, progress) {
  $("progress").value = progress;
  $("stage").textContent = `${STAGES[stage] || stage}: ${Math.round(progress * 100)}%`;
  $("stage").dataset.stage = stage;
  $("stage").dataset.history = `${$("stage").dataset.history || ""}${stage}:${progress} `;  // for the tests
}

async function generate(event) {
  event.preventDefault();
  showError("");
  await state.queue;  // the mask last shown is the one the swap uses
  cancelGenerate();
  const controller = new AbortController();
  state.generating = controller;
  const body = {
    character: $("character").value, steps: $("steps").value, strength: $("strength").value,
    seed: $("seed").value, upscale: $("upscale").value,
  };
  $("generate").disabled = true; $("cancel").hidden = false; $("progress-box").hidden = false;
  $("preview").hidden = true;
  $("stage").dataset.history = "";
  setProgress("queued", 0);
  try {
    const response = await api(`s/${state.session}/generate`, { ...json(body), signal: controller.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = JSON.parse(buffer.slice(0, newline));
        buffer = buffer.slice(newline + 1);
        if (line.error) throw new Error(line.error);
        if (line.cancelled) { setProgress("cancelled", $("progress").value); return; }
        if (line.done) { setProgress("done", 1); showResult(); return; }
        setProgress(line.stage, line.progress);
        if (line.preview) { $("preview").src = `data:image/png;base64,${line.preview}`; $("preview").hidden = false; }
      }
    }
    throw new Error("The server stopped answering before the result came.");
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    if (state.generating === controller) state.generating = null;
    $("generate").disabled = false; $("cancel").hidden = true;
  }
}

function cancelGenerate() {
  if (!state.generating) return;
  state.generating.abort();
  state.generating = null;
  api(`s/${state.session}/cancel`, { method: "POST" }).catch(() => {});
  setProgress("cancelled", $("progress").value);
}

function showResult() {
  const stamp = Date.now();
  $("before-img").src = `/api/s/${state.session}/photo.png?t=${stamp}`;
  $("result-img").src = `/api/s/${state.session}/result.png?t=${stamp}`;
  $("download").href = `/api/s/${state.session}/result.png?download=1&t=${stamp}`;
  $("download").setAttribute("download", `${(state.photo.name || "photo").replace(/\.[^.]*$/, "")}.isekai.png`);
  $("result-panel").hidden = false;
}

$("options").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancelGenerate);
setupEditor();
start();
