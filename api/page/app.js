// The radiologist's page: plain JavaScript, no build step. Every call carries the bearer token,
// kept in this tab's sessionStorage only.
"use strict";

const LABELS = ["Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
  "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
  "Fracture", "Support Devices"];
const PALETTE = ["#ff3b30", "#ff9500", "#ffcc00", "#34c759", "#af52de", "#ff2d55", "#5ac8fa", "#a2845e"];
const ANSWER_COLOUR = "#00e5ff";

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("radvlm-token"), study: null, result: null, image: null,
  base: null, zoom: 1, shown: new Set(), answerBoxes: [], conversation: null, agreement: [], offset: 0 };

// A DICOM person name (PN: Family^Given^Middle^Prefix^Suffix, its first component group) as people write it
function personName(pn) {
  if (!pn) return "";
  const [family = "", given = "", middle = "", prefix = "", suffix = ""] = pn.split("=")[0].split("^");
  const first = [prefix, given, middle].filter(Boolean).join(" ");
  return [family, [first, suffix].filter(Boolean).join(" ")].filter(Boolean).join(", ");
}

// A DICOM date (DA: YYYYMMDD) as ISO 8601; anything else as it came
function dicomDate(da) {
  return /^\d{8}$/.test(da || "") ? `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6, 8)}` : (da || "");
}

class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.title = problem.title;
  }
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${state.token}`, ...(options.headers || {}) };
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) { logout(); }
  if (!response.ok) {
    let problem = {};
    try { problem = await response.json(); } catch (e) { /* not JSON */ }
    throw new ApiError(response.status, problem);
  }
  return response;
}

function show(panel) {
  for (const id of ["login-panel", "list-panel", "study-panel", "audit-panel"]) { $(id).hidden = id !== panel; }
}

// --- log in ------------------------------------------------------------------------------------
async function login(token) {
  state.token = token;
  try {
    const me = await (await api("/me")).json();
    sessionStorage.setItem("radvlm-token", token);
    $("who").textContent = `${me.name} (${me.role})`;
    $("logout").hidden = false;
    await loadAgreement().catch(() => { state.agreement = []; });  // the figures beside findings are extras
    await listStudies();
    // only now: an audit log opened while the list loaded would be hidden again by the list
    $("show-studies").hidden = $("show-audit").hidden = me.role !== "admin";
  } catch (error) {
    state.token = null;
    $("login-error").textContent = error.status === 401 ? "This token is not known here." : error.message;
    show("login-panel");
  }
}

function logout() {
  sessionStorage.removeItem("radvlm-token");
  state.token = null;
  $("who").textContent = "";
  $("logout").hidden = $("show-studies").hidden = $("show-audit").hidden = true;
  show("login-panel");
}

// --- study list --------------------------------------------------------------------------------
async function listStudies() {
  const query = new URLSearchParams();
  if ($("filter-state").value) query.set("state", $("filter-state").value);
  if ($("filter-name").value) query.set("patient_name", $("filter-name").value);
  if ($("filter-patient").value) query.set("patient_id", $("filter-patient").value);
  if ($("filter-accession").value) query.set("accession", $("filter-accession").value);
  if ($("filter-urgent").checked) query.set("urgent_first", "true");
  const size = Number($("page-size").value);
  query.set("limit", String(size));
  query.set("offset", String(state.offset));
  const studies = await (await api(`/studies?${query}`)).json();
  $("shown").textContent = studies.count
    ? `${state.offset + 1}–${state.offset + studies.data.length} of ${studies.count}` : "no studies";
  $("newer").disabled = state.offset === 0;
  $("older").disabled = state.offset + studies.data.length >= studies.count;
  const body = $("studies").querySelector("tbody");
  body.replaceChildren();
  for (const study of studies.data) {
    const row = document.createElement("tr");
    row.dataset.uid = study.study_instance_uid;
    for (const value of [personName(study.patient_name), study.patient_id, study.accession_number,
      dicomDate(study.study_date),
      study.state, findingsCell(study), new Date(study.last_received_at).toLocaleString()]) {
      const cell = document.createElement("td");
      if (value instanceof Node) cell.append(value); else cell.textContent = value ?? "";
      row.append(cell);
    }
    if (study.urgent.length) row.classList.add("urgent");
    row.addEventListener("click", () => openStudy(study.study_instance_uid));
    body.append(row);
  }
  show("list-panel");
}

// The study's findings, those the site counts as urgent in bold red.
function findingsCell(study) {
  const cell = document.createDocumentFragment();
  (study.findings || []).forEach((label, index) => {
    if (index) cell.append(", ");
    const name = document.createElement(study.urgent.includes(label) ? "strong" : "span");
    name.textContent = label;
    cell.append(name);
  });
  return cell;
}

// --- audit log (admins) --------------------------------------------------------------------------
const OUTCOMES = { 0: "success", 4: "minor failure", 8: "serious failure", 12: "major failure" };

async function showAudit() {
  const query = new URLSearchParams({ limit: "200" });
  for (const [id, key] of [["audit-user", "user_name"], ["audit-study", "study"], ["audit-action", "action"]]) {
    if ($(id).value.trim()) query.set(key, $(id).value.trim());
  }
  $("audit-error").textContent = "";
  const body = $("audit").querySelector("tbody");
  body.replaceChildren();
  show("audit-panel");
  let events;
  try {
    events = await (await api(`/audit?${query}`)).json();
  } catch (error) {
    $("audit-error").textContent = error.message;
    return;
  }
  for (const event of events) {
    const row = document.createElement("tr");
    for (const value of [new Date(event.at).toLocaleString(), event.user_name, event.role, event.action,
      `${event.event_id} ${event.event_action_code}`, event.study_instance_uid, OUTCOMES[event.outcome] ?? event.outcome,
      event.detail, event.client]) {
      const cell = document.createElement("td");
      cell.textContent = value ?? "";
      row.append(cell);
    }
    body.append(row);
  }
}

// --- viewer ------------------------------------------------------------------------------------
async function openStudy(uid) {
  const detail = await (await api(`/studies/${encodeURIComponent(uid)}`)).json();
  state.study = detail;
  $("study-title").textContent = `${personName(detail.patient_name)} ${detail.accession_number || ""} — ${detail.state}`;
  show("study-panel");
  const images = detail.result ? detail.result.images : [];
  renderImageChoice(images);
  renderSignOff();
  await showImage(images[0] || null);
}

// A study with several analysed frontal images: one button each; each has its own draft and chat.
function renderImageChoice(images) {
  const choice = $("image-choice");
  choice.replaceChildren();
  if (images.length < 2) return;
  images.forEach((image, index) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `Image ${index + 1}`;
    button.dataset.sop = image.sop_instance_uid;
    const instance = state.study.instances.find((i) => i.sop_instance_uid === image.sop_instance_uid);
    button.title = instance ? instance.reason || "" : "";
    button.addEventListener("click", () => showImage(image));
    choice.append(button);
  });
}

async function showImage(image) {
  const uid = state.study.study_instance_uid;
  state.result = image;
  state.answerBoxes = [];
  state.conversation = null;
  $("answers").replaceChildren();
  $("chat-error").textContent = "";
  for (const button of $("image-choice").children) {
    button.setAttribute("aria-pressed", String(Boolean(image) && button.dataset.sop === image.sop_instance_uid));
  }
  renderFindings();
  if (!state.result) {
    $("report").textContent = state.study.reason || `This study is ${state.study.state}: no draft yet.`;
    return;
  }
  $("report").textContent = state.result.report.text;
  const current = () => state.result === image;  // another image chosen meanwhile: leave the page to it
  try {
    const earlier = await latestConversation(uid, image);
    if (!current()) return;
    resumeConversation(earlier);
  } catch (error) {
    $("chat-error").textContent = `Earlier questions not shown: ${error.message}`;
  }
  let picture;
  try {
    picture = await (await api(`/studies/${encodeURIComponent(uid)}/image.png?boxes=false&sop=${
      encodeURIComponent(image.sop_instance_uid)}`)).blob();
  } catch (error) {  // e.g. 410: the images were removed after node.keep_images_days
    if (current()) $("chat-error").textContent = error.message;
    return;
  }
  const bitmap = await createImageBitmap(picture);
  if (!current()) return;
  const canvas = $("image");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  state.base = context.getImageData(0, 0, canvas.width, canvas.height);
  resetWindow();
  fit();
}

function groundings() {
  return (state.result ? state.result.groundings : []).filter((g) => g.answer.boxes.length);
}

function renderFindings() {
  const list = $("findings");
  list.replaceChildren();
  state.shown = new Set();
  if (!state.result) return;
  const boxed = new Map(groundings().map((g, i) => [g.label, PALETTE[i % PALETTE.length]]));
  const present = Object.entries(state.result.labels).filter(([label, on]) => on).map(([label]) => label);
  for (const label of present) {
    const item = document.createElement("li");
    if (boxed.has(label)) {
      const toggle = document.createElement("input");
      toggle.type = "checkbox";
      toggle.checked = true;
      toggle.className = "finding-toggle";
      toggle.dataset.label = label;
      toggle.addEventListener("change", () => {
        if (toggle.checked) state.shown.add(label); else state.shown.delete(label);
        draw();
      });
      state.shown.add(label);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = boxed.get(label);
      item.append(toggle, swatch);
    }
    item.append(document.createTextNode(label));
    const track = trackRecord(label);
    if (track) item.append(track);
    list.append(item);
  }
}

// How often radiologists here kept each finding that drafts of this model revision named (GET /agreement).
async function loadAgreement() {
  state.agreement = await (await api("/agreement")).json();
}

function trackRecord(label) {
  const revision = state.study && state.study.result ? state.study.result.model_revision : null;
  const entry = state.agreement.find((e) => e.model_revision === revision);
  const counts = entry ? entry.findings.find((f) => f.label === label) : null;
  if (!counts || counts.kept + counts.removed === 0) return null;
  const track = document.createElement("span");
  track.className = "track";
  track.textContent = ` kept ${counts.kept} of ${counts.kept + counts.removed} here`;
  track.title = "How often this site's radiologists kept this finding when this model revision drafted it";
  return track;
}

function resetWindow() { $("window").value = 255; $("level").value = 128; draw(); }

function draw() {
  if (!state.base) return;
  const canvas = $("image");
  const context = canvas.getContext("2d");
  const width = Number($("window").value), level = Number($("level").value);
  const low = level - width / 2;
  const lut = new Uint8ClampedArray(256);
  for (let v = 0; v < 256; v++) lut[v] = ((v - low) / width) * 255;
  const out = new ImageData(new Uint8ClampedArray(state.base.data), state.base.width, state.base.height);
  const data = out.data;
  for (let i = 0; i < data.length; i += 4) { data[i] = data[i + 1] = data[i + 2] = lut[data[i]]; }
  context.putImageData(out, 0, 0);
  const line = Math.max(2, Math.round(canvas.width / 400));
  groundings().forEach((g, i) => {
    if (state.shown.has(g.label)) strokeBoxes(context, g.answer.boxes, PALETTE[i % PALETTE.length], line);
  });
  strokeBoxes(context, state.answerBoxes, ANSWER_COLOUR, line);
}

function strokeBoxes(context, boxes, colour, line) {
  context.strokeStyle = colour;
  context.lineWidth = line;
  for (const box of boxes) {
    const [x1, y1, x2, y2] = box.px;
    context.strokeRect(x1, y1, x2 - x1, y2 - y1);
  }
}

function setZoom(zoom) {
  state.zoom = Math.min(8, Math.max(0.05, zoom));
  const canvas = $("image");
  canvas.style.width = `${canvas.width * state.zoom}px`;
  canvas.style.height = `${canvas.height * state.zoom}px`;
}

function fit() {
  const stage = $("stage"), canvas = $("image");
  setZoom(Math.min(stage.clientWidth / canvas.width, stage.clientHeight / canvas.height));
}

function windowDrag() {
  let last = null;
  const canvas = $("image");
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  canvas.addEventListener("mousedown", (event) => { if (event.button === 2) last = [event.clientX, event.clientY]; });
  window.addEventListener("mouseup", () => { last = null; });
  window.addEventListener("mousemove", (event) => {
    if (!last) return;
    $("window").value = Number($("window").value) + (event.clientX - last[0]);
    $("level").value = Number($("level").value) - (event.clientY - last[1]);
    last = [event.clientX, event.clientY];
    draw();
  });
  $("stage").addEventListener("wheel", (event) => {
    event.preventDefault();
    setZoom(state.zoom * (event.deltaY < 0 ? 1.15 : 1 / 1.15));
  }, { passive: false });
}

// --- chat --------------------------------------------------------------------------------------
// Your newest conversation about this image: its questions show again, and the next one continues it.
async function latestConversation(uid, image) {
  const mine = await (await api(`/studies/${encodeURIComponent(uid)}/conversations`)).json();
  return mine.filter((c) => c.sop_instance_uid === image.sop_instance_uid).pop() || null;
}

function resumeConversation(conversation) {
  if (!conversation) return;
  state.conversation = conversation;
  for (const exchange of conversation.exchanges) addTurn(exchange.question, exchange.answer ?? exchange.error ?? "");
}

function addTurn(question, answered) {
  const turn = document.createElement("div");
  turn.className = "turn";
  const asked = document.createElement("div");
  asked.className = "question";
  asked.textContent = question;
  const answer = document.createElement("div");
  answer.className = "answer";
  if (answered !== undefined) {
    answer.textContent = answered;
    answer.dataset.done = "true";
  }
  turn.append(asked, answer);
  $("answers").append(turn);
  return answer;
}

async function newConversation(uid) {
  const response = await api(`/studies/${uid}/conversations`, { method: "POST",
    json: { sop_instance_uid: state.result.sop_instance_uid } });
  return response.json();
}

async function ask(question) {
  const uid = encodeURIComponent(state.study.study_instance_uid);
  if (!state.conversation) state.conversation = await newConversation(uid);
  const answer = addTurn(question);
  const stream = () => api(`/studies/${uid}/conversations/${state.conversation.id}/questions/stream`,
    { method: "POST", json: { text: question }, headers: { Accept: "text/event-stream" } });
  let response;
  try {
    response = await stream();
  } catch (error) {  // a resumed conversation that has all its rounds: the question starts a new one
    if (error.status !== 409 || error.title !== "conversation full") throw error;
    state.conversation = await newConversation(uid);
    response = await stream();
  }
  for await (const event of serverSentEvents(response)) {
    if (event.event === "token") {
      answer.textContent += event.data.text;
    } else if (event.event === "done") {
      answer.textContent = event.data.answer;
      answer.dataset.done = "true";
      state.answerBoxes = event.data.boxes;
      draw();
    } else if (event.event === "error") {
      throw new ApiError(event.data.status, event.data);
    }
  }
}

async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { event: "message", data: "" };
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event.event = line.slice(6).trim();
        else if (line.startsWith("data:")) event.data += line.slice(5).trimStart();
      }
      if (event.data) { event.data = JSON.parse(event.data); yield event; }
    }
  }
}

// --- sign-off ----------------------------------------------------------------------------------
// The form starts from the first image's draft, whichever image is shown: the sign-off is the study's, and
// the agreement figures count the first image's findings as drafted.
function renderSignOff() {
  const box = $("signoff-findings");
  box.querySelectorAll("label").forEach((label) => label.remove());
  const signed = state.study.sign_off;
  const first = state.study.result ? state.study.result.images[0] : null;
  const labels = signed ? new Set(signed.findings) : new Set(
    first ? Object.entries(first.labels).filter(([l, on]) => on && l !== "No Finding").map(([l]) => l) : []);
  for (const label of LABELS) {
    const wrapper = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = label;
    input.checked = labels.has(label);
    wrapper.append(input, document.createTextNode(` ${label}`));
    box.append(wrapper);
  }
  $("signoff-report").value = signed ? signed.report : (first ? first.report.text : "");
  $("signoff-submit").disabled = Boolean(signed) || !first;
  $("signoff-status").textContent = signed
    ? `Signed off by ${signed.user_name} at ${new Date(signed.signed_at).toLocaleString()}.` : "";
}

async function signOff() {
  const uid = encodeURIComponent(state.study.study_instance_uid);
  const findings = [...$("signoff-findings").querySelectorAll("input:checked")].map((input) => input.value);
  try {
    const response = await api(`/studies/${uid}/sign-off`, { method: "POST",
      json: { report: $("signoff-report").value, findings } });
    const signed = await response.json();
    $("signoff-status").textContent = `Signed off: verified report ${signed.sr_uid} sent ` +
      `(${signed.deliveries} deliver${signed.deliveries === 1 ? "y" : "ies"} queued).`;
    $("signoff-submit").disabled = true;
  } catch (error) {
    $("signoff-status").textContent = `Not signed off: ${error.message}`;
    return;
  }
  try {  // this sign-off now counts in the figures beside each finding
    await loadAgreement();
    renderFindings();
    draw();
  } catch (error) {
    $("signoff-status").textContent += ` (the figures beside the findings are not updated: ${error.message})`;
  }
}

// --- wiring ------------------------------------------------------------------------------------
$("login-form").addEventListener("submit", (event) => { event.preventDefault(); login($("token").value); });
$("logout").addEventListener("click", logout);
$("show-studies").addEventListener("click", listStudies);
$("show-audit").addEventListener("click", showAudit);
$("audit-filters").addEventListener("submit", (event) => { event.preventDefault(); showAudit(); });
$("filters").addEventListener("submit", (event) => { event.preventDefault(); state.offset = 0; listStudies(); });
$("page-size").addEventListener("change", () => { state.offset = 0; listStudies(); });
$("newer").addEventListener("click", () => {
  state.offset = Math.max(0, state.offset - Number($("page-size").value));
  listStudies();
});
$("older").addEventListener("click", () => { state.offset += Number($("page-size").value); listStudies(); });
$("back").addEventListener("click", listStudies);
$("window").addEventListener("input", draw);
$("level").addEventListener("input", draw);
$("reset-wl").addEventListener("click", resetWindow);
$("zoom-in").addEventListener("click", () => setZoom(state.zoom * 1.25));
$("zoom-out").addEventListener("click", () => setZoom(state.zoom / 1.25));
$("zoom-fit").addEventListener("click", fit);
$("ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  $("question").value = "";
  $("chat-error").textContent = "";
  $("ask").disabled = true;
  try { await ask(question); } catch (error) { $("chat-error").textContent = error.message; }
  finally { $("ask").disabled = false; }
});
$("signoff-form").addEventListener("submit", (event) => { event.preventDefault(); signOff(); });
windowDrag();
if (state.token) login(state.token); else show("login-panel");
