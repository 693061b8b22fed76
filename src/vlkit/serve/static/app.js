// The web page of `vlkit serve`: plain JavaScript, no build step and nothing fetched from outside the server, so it
// works offline. It asks GET /v1/models what is served and shows the matching view: a chat (NeVA), image search (CLIP
// with an index), zero-shot labels (CLIP without one) or top-5 classes (a classifier). Everything goes through the
// same public HTTP API a program would use.
"use strict";

const KEY_STORAGE = "vlkit.apiKey";
const $ = (id) => document.getElementById(id);

let modelId = null;

// ---- API helpers ----------------------------------------------------------------------------------------------

function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The server answers errors in OpenAI's shape {"error": {"message": ...}}; anything else (a proxy's HTML page, a
// dropped connection) still becomes a readable message rather than a silent failure.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text).error.message;
    if (message) return `${message} (HTTP ${response.status})`;
  } catch (_) {
    // not JSON in OpenAI's shape: fall through to the raw text
  }
  return `HTTP ${response.status} ${response.statusText}: ${text.slice(0, 300)}`;
}

async function postJSON(path, body, signal) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

// Runs an async action and shows its failure on the page instead of losing it in the console.
async function guarded(action) {
  clearError();
  try {
    await action();
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message || String(err));
  }
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// Images behind the API (search thumbnails) are fetched with the API key, which a plain <img src> could not send.
async function loadImageInto(img, url) {
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) throw new Error(await errorMessage(response));
  img.src = URL.createObjectURL(await response.blob());
}

// ---- image drop zones -------------------------------------------------------------------------------------------

// A drop zone is a <label> around a file input: clicking, keyboard focus and drag-and-drop all end in onImage(dataURL,
// file). The preview shows what will be sent.
function setupDrop(inputId, previewId, onImage) {
  const input = $(inputId);
  const zone = input.closest(".drop");
  const preview = $(previewId);
  const take = (file) =>
    guarded(async () => {
      if (!file) return;
      if (!file.type.startsWith("image/")) throw new Error(`${file.name} is not an image`);
      const url = await readAsDataURL(file);
      preview.src = url;
      preview.alt = `Selected image ${file.name}`;
      preview.hidden = false;
      zone.classList.add("has-image");
      await onImage(url, file);
    });
  input.addEventListener("change", () => take(input.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    take(event.dataTransfer.files[0]);
  });
  return () => {
    input.value = "";
    preview.removeAttribute("src");
    preview.hidden = true;
    zone.classList.remove("has-image");
  };
}

// Score bars for classification results: label, a bar as wide as the probability, the percentage.
function renderBars(list, data) {
  list.replaceChildren();
  for (const item of data) {
    const row = document.createElement("li");
    row.className = "bar-row";
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = item.label;
    const track = document.createElement("span");
    track.className = "bar-track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = `${(item.score * 100).toFixed(1)}%`;
    track.append(fill);
    const score = document.createElement("span");
    score.className = "bar-score";
    score.textContent = `${(item.score * 100).toFixed(1)}%`;
    row.append(label, track, score);
    list.append(row);
  }
}

// ---- chat (NeVA) --------------------------------------------------------------------------------------------------

// The whole conversation is re-sent with every question, as the OpenAI API expects: the server keeps no state.
let messages = [];
let pendingImage = null;
let streaming = null; // the AbortController of the answer being streamed

function addBubble(role, text, imageUrl) {
  const item = document.createElement("li");
  item.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  item.append(who);
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "Image sent with this message";
    item.append(img);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(body);
  $("chat-log").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

// Reads the server-sent events of a streamed chat completion ("data: {chunk}\n\n" ... "data: [DONE]") and calls
// onDelta with each piece of text as it arrives.
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n"); // SSE allows CRLF too
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) onDelta(delta.content);
      }
    }
  }
}

function chatRequest() {
  const request = { model: modelId, messages, stream: true };
  const maxTokens = parseInt($("max-tokens").value, 10);
  const temperature = parseFloat($("temperature").value);
  const seed = parseInt($("seed").value, 10);
  if (maxTokens > 0) request.max_tokens = maxTokens;
  if (!Number.isNaN(temperature)) request.temperature = temperature;
  if (!Number.isNaN(seed)) request.seed = seed; // makes a sampled answer repeatable
  return request;
}

function setStreaming(controller) {
  streaming = controller;
  $("chat-send").disabled = controller !== null;
  $("chat-stop").hidden = controller === null;
}

async function sendChat(clearImage) {
  const text = $("chat-input").value.trim();
  if (!text || streaming) return;
  const content = pendingImage
    ? [
        { type: "text", text },
        { type: "image_url", image_url: { url: pendingImage } },
      ]
    : text;
  messages.push({ role: "user", content });
  addBubble("user", text, pendingImage);
  $("chat-input").value = "";
  pendingImage = null;
  clearImage();

  const answer = addBubble("assistant", "");
  answer.classList.add("pending");
  const body = answer.querySelector(".text");
  const controller = new AbortController();
  setStreaming(controller);
  let ok = false;
  await guarded(async () => {
    const response = await postJSON("v1/chat/completions", chatRequest(), controller.signal);
    await readStream(response, (delta) => {
      body.textContent += delta;
    });
    ok = true;
  });
  setStreaming(null);
  answer.classList.remove("pending");
  if (ok || body.textContent) {
    messages.push({ role: "assistant", content: body.textContent });
  } else {
    // The question got no answer (an error): drop it from the conversation so the next question is not sent after it.
    messages.pop();
    answer.classList.add("failed");
    body.textContent = "(no answer)";
  }
  answer.dataset.done = "true"; // lets the browser test wait for the end of the stream
}

function setupChat() {
  const clearImage = setupDrop("chat-image", "chat-preview", (url) => {
    pendingImage = url;
  });
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sendChat(clearImage);
  });
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      sendChat(clearImage);
    }
  });
  $("chat-stop").addEventListener("click", () => streaming && streaming.abort());
  $("new-chat").addEventListener("click", () => {
    if (streaming) streaming.abort();
    messages = [];
    pendingImage = null;
    clearImage();
    $("chat-log").replaceChildren();
    clearError();
    $("chat-input").focus();
  });
}

// ---- search (CLIP with an index) ----------------------------------------------------------------------------------

let thumbnailUrls = [];

async function showSearch(request) {
  const response = await postJSON("v1/search", { ...request, top_k: 12 });
  const hits = (await response.json()).data;
  for (const url of thumbnailUrls) URL.revokeObjectURL(url);
  thumbnailUrls = [];
  const grid = $("search-results");
  grid.replaceChildren();
  if (hits.length === 0) grid.textContent = "No matches.";
  const loads = hits.map((hit) => {
    const item = document.createElement("li");
    item.className = "hit";
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    const name = hit.caption || hit.path || hit.key || `item ${hit.row}`;
    img.alt = name;
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `#${hit.rank} · ${hit.score.toFixed(3)}`;
    const text = document.createElement("span");
    text.className = "caption";
    text.textContent = name;
    caption.append(score, text);
    figure.append(img, caption);
    item.append(figure);
    grid.append(item);
    return loadImageInto(img, hit.image_url).then(() => thumbnailUrls.push(img.src));
  });
  await Promise.all(loads);
}

function setupSearch(model) {
  $("search-info").textContent = `${model.index.items} indexed items · ${model.index.dim}-d embeddings`;
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(() => showSearch({ query: $("search-query").value.trim() }));
  });
  setupDrop("search-image", "search-preview", (url) => showSearch({ image: url }));
}

// ---- zero-shot classification (CLIP without an index) -------------------------------------------------------------

function setupZeroShot() {
  let image = null;
  const classify = async () => {
    const labels = $("zs-labels")
      .value.split(/[\n,]/)
      .map((label) => label.trim())
      .filter(Boolean);
    if (!image) throw new Error("Choose an image first.");
    if (labels.length === 0) throw new Error("Enter at least one label.");
    const response = await postJSON("v1/classify", { image, labels, top_k: labels.length });
    renderBars($("zs-results"), (await response.json()).data);
  };
  setupDrop("zs-image", "zs-preview", async (url) => {
    image = url;
    if ($("zs-labels").value.trim()) await classify();
  });
  $("zeroshot-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(classify);
  });
}

// ---- classifier ---------------------------------------------------------------------------------------------------

function setupClassifier(model) {
  if (model.classes) $("classify-info").textContent = `${model.classes.length} classes: ${model.classes.join(", ")}`;
  setupDrop("cls-image", "cls-preview", async (image) => {
    const response = await postJSON("v1/classify", { image, top_k: 5 });
    renderBars($("cls-results"), (await response.json()).data);
  });
}

// ---- start --------------------------------------------------------------------------------------------------------

async function start() {
  const response = await fetch("v1/models", { headers: authHeaders() });
  if (!response.ok) throw new Error(await errorMessage(response));
  const model = (await response.json()).data[0];
  modelId = model.id;
  $("model-name").textContent = `${model.id} · ${model.kind}`;
  document.body.dataset.kind = model.kind;
  let view;
  if (model.kind === "neva") {
    setupChat();
    view = "chat-view";
  } else if (model.kind === "clip" && model.index) {
    setupSearch(model);
    view = "search-view";
  } else if (model.kind === "clip") {
    setupZeroShot();
    view = "zeroshot-view";
  } else if (model.kind === "classifier") {
    setupClassifier(model);
    view = "classify-view";
  } else {
    throw new Error(`this page does not know models of kind ${model.kind}`);
  }
  $(view).hidden = false;
  document.body.dataset.ready = "true";
}

function setupKeyForm() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    // A new key may unlock a page that failed to load: start again with it.
    if (!modelId) guarded(start);
  });
  $("error-close").addEventListener("click", clearError);
}

// Small images (the shapes dataset's are 32 px) are shown larger than they are: CSS keeps their pixels sharp.
document.addEventListener(
  "load",
  (event) => {
    if (event.target.tagName === "IMG" && event.target.naturalWidth < 100) event.target.classList.add("tiny");
  },
  true, // load events do not bubble: catch them on the way down
);

setupKeyForm();
guarded(start).then(() => {
  if (!modelId) $("model-name").textContent = "No model loaded";
});
