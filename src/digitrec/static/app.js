// digitrec page: draw or upload, send the image to the REST API, show the answer and why. No build step.
"use strict";

const $ = (id) => document.getElementById(id);

const MODES = {
  digit: { width: 560, height: 560, line: 38, sendScale: 0.25, title: "Draw a digit", placeholder: "Draw here",
           hint: "Use your mouse, finger or pen. Or drop a photo here." },
  number: { width: 1120, height: 400, line: 30, sendScale: 0.5, title: "Write a number", placeholder: "Write a number here",
            hint: "Write digits side by side, or drop a photo of a number." },
};
const UPLOAD_MAX_SIDE = 1600;  // phone photos are shrunk in the browser: the model needs far fewer pixels
const MIN_SEND_INTERVAL_MS = 120;
const SURE_FROM = 0.9;  // an answer less sure than this is "Probably a 4" (from 50%) or "Perhaps a 4", not "It's a 4"
const MAX_RETRY_S = 10;  // a server that is down is asked again at most this far apart
const MODEL_INFO_RETRY_S = 10;  // the footer asks /healthz again this long after it did not answer
const READING_NOTE_MS = 250;  // a request not answered by then marks the answer on screen as being replaced

const pad = $("pad");
const answerRegion = $("answer");
const ctx = pad.getContext("2d");
const boxes = $("boxes");
const boxCtx = boxes.getContext("2d");
const photo = $("photo");
const resultCard = document.querySelector(".result-card");

const state = {
  mode: "digit",
  strokes: [],        // each stroke is a list of [x, y] points in canvas pixels
  drawing: null,      // the stroke under the pointer
  pointerId: null,    // the pointer drawing it: other fingers touching the pad meanwhile are ignored
  photo: null,        // a Blob when the input is a photo instead of a drawing
  photoUrl: null,     // its object URL, shown in #photo: revoked when the photo goes
  preparing: false,   // a chosen photo is being shrunk (seconds for 48 MP): it is not the input yet
  unshowable: false,  // this browser cannot show the photo (TIFF, or not an image): a note stands in for it
  photoOutcome: "pending",  // what the server made of the photo: "pending", "read" or "failed" (for that note)
  generation: 0,      // bumped whenever the input changes: an answer to an older one offers no corrections
  source: 0,          // bumped whenever the input is replaced (a photo, Clear, the other mode): late answers
                      // to the input it replaced are dropped, never shown over the new one
  inFlight: false,
  dirty: false,
  lastSent: 0,
  lastBlob: null,     // the exact image the current answer is about (a correction sends it back)
  lastPrediction: null,
  lastDigits: null,   // the boxes drawn on the pad, drawn again when the pad changes shape (a photo's)
  retryTimer: null,   // sends the input again after a 503 or while the server cannot be reached
  retrying: false,    // the request being sent is such a retry
  retryDelay: 1,      // seconds the last retry waited: each retry that fails again waits twice as long, up to 10
  unreachable: false, // the last request found no server: the one that answers next may serve a new model
  readingTimer: null, // marks the answer on screen as "Reading…" when a request takes a while
  modelUnknown: false, // /healthz did not answer: the next answer that comes asks it again
};

// ---------------------------------------------------------------------------------------------- drawing

function padShape() {
  // The canvas takes the pad's shape from the stylesheet (a number's pad is taller on a phone held upright):
  // as tall as the mode's, as wide as that shape makes it. CSS only scales it, never stretches the ink.
  const mode = MODES[state.mode];
  const [w, h = 1] = (getComputedStyle($("pad-wrap")).aspectRatio || "").split("/").map(parseFloat);
  return w > 0 && h > 0 ? [Math.round(mode.height * w / h), mode.height] : [mode.width, mode.height];
}

function resetPad() {
  const mode = MODES[state.mode];
  const [width, height] = padShape();
  for (const canvas of [pad, boxes]) { canvas.width = width; canvas.height = height; }
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.strokeStyle = "#111";
  ctx.lineWidth = mode.line;
  boxCtx.clearRect(0, 0, boxes.width, boxes.height);
}

function redraw() {
  // a pad that became narrower than the ink (a phone turned upright) shrinks the ink just enough to keep it on the
  // pad: ink that fits stays as it is, so turning the phone back and forth never shrinks it again (nor does Undo
  // on a pad of the same shape, however near its edge the ink lies)
  const [width] = padShape();
  let right = 0;
  for (const stroke of state.strokes) for (const point of stroke) right = Math.max(right, Math.min(point[0], pad.width));
  const line = MODES[state.mode].line;
  const scale = width < pad.width ? Math.min(1, (width - line) / right) : 1;  // ink half a line in from the edge
  if (scale < 1) for (const stroke of state.strokes) for (const point of stroke) { point[0] *= scale; point[1] *= scale; }
  resetPad();
  for (const stroke of state.strokes) drawStroke(stroke);
}

function drawStroke(points) {
  ctx.beginPath();
  ctx.moveTo(points[0][0], points[0][1]);
  if (points.length === 1) ctx.lineTo(points[0][0] + 0.01, points[0][1]);  // a dot
  for (let i = 1; i < points.length; i++) ctx.lineTo(points[i][0], points[i][1]);
  ctx.stroke();
}

function canvasPoint(event) {
  const rect = pad.getBoundingClientRect();
  return [(event.clientX - rect.left) * pad.width / rect.width, (event.clientY - rect.top) * pad.height / rect.height];
}

pad.addEventListener("pointerdown", (event) => {
  if (event.button !== 0 && event.pointerType === "mouse") return;
  event.preventDefault();
  if (state.drawing) return;  // a second finger, or a palm, while one finger draws: only the first one writes
  if (state.photo || state.preparing) clearAll();  // drawing replaces a photo, or one still being prepared
  pad.setPointerCapture(event.pointerId);
  state.pointerId = event.pointerId;
  state.drawing = [canvasPoint(event)];
  state.strokes.push(state.drawing);
  // the answer follows the pen: a screen reader hears it once the pen lifts, not every tenth of a second
  answerRegion.setAttribute("aria-busy", "true");
  drawStroke(state.drawing);
  inputChanged();
});

pad.addEventListener("pointermove", (event) => {
  if (!state.drawing || event.pointerId !== state.pointerId) return;
  event.preventDefault();
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  const last = state.drawing[state.drawing.length - 1];
  ctx.beginPath();
  ctx.moveTo(last[0], last[1]);
  for (const e of events.length ? events : [event]) {
    const point = canvasPoint(e);
    state.drawing.push(point);
    ctx.lineTo(point[0], point[1]);
  }
  ctx.stroke();
  // A number is read when the pen lifts: a reading costs up to a second or two of CPU, and a half-written
  // digit reads wrong anyway. A single digit's answer follows the pen.
  if (state.mode === "digit") schedulePrediction();
});

function endStroke(event) {
  if (!state.drawing || event.pointerId !== state.pointerId) return;
  state.drawing = null;
  reshapePad();  // the phone turned while the pen was down
  answerRegion.removeAttribute("aria-busy");
  // The answers while the pen moved were of part of this stroke: one still on its way is not current either
  // (it turned the corrections on again, over the half-drawn image).
  state.generation += 1;
  forgetAnsweredImage();
  schedulePrediction(true);
}

function forgetAnsweredImage() {
  state.lastBlob = null;
  setCorrectionEnabled(false);
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

$("undo").addEventListener("click", () => {
  if (state.photo || state.preparing) clearAll();
  else {
    state.strokes.pop();
    redraw();
    inputChanged();
    schedulePrediction(true);
  }
  keepFocus($("undo"));
});
$("clear").addEventListener("click", () => { clearAll(); keepFocus($("clear")); });

function keepFocus(button) {
  // A button that has just disabled itself drops the keyboard focus to the page's start; hand it to Upload.
  // Only the keyboard's focus (:focus-visible): after a mouse click Upload would wear a focus ring for nothing.
  if (button.disabled && document.activeElement === button && button.matches(":focus-visible")) $("upload").focus();
}

function clearAll() {
  state.source += 1;
  state.strokes = [];
  dropPhoto();
  redraw();
  inputChanged();
  showEmpty();
}

function dropPhoto() {
  // The photo, or the one being prepared, goes: its object URL too (each holds the whole file in memory).
  state.photo = null;
  state.preparing = false;
  state.unshowable = false;
  photo.hidden = true;
  photo.removeAttribute("src");
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = null;
}

function inputChanged() {
  state.generation += 1;
  // A correction sends the image its answer is about: none until the changed input's answer comes (a click
  // meanwhile, on a busy server, stored the drawing before the last stroke or undo under the new label).
  forgetAnsweredImage();
  const bare = !state.photo && state.strokes.length === 0;
  const placeholder = $("placeholder");
  placeholder.classList.remove("note");
  placeholder.textContent = MODES[state.mode].placeholder;
  if (state.preparing) {  // the pad is empty for a few seconds: say why (Clear, Undo or a stroke cancels it)
    placeholder.textContent = "Preparing the photo…";
    placeholder.classList.add("note");
  }
  placeholder.hidden = !bare;
  $("undo").disabled = bare && !state.preparing;
  $("clear").disabled = bare && !state.preparing;
  boxCtx.clearRect(0, 0, boxes.width, boxes.height);
  state.lastDigits = null;  // the boxes drawn were of the input before
}

// ---------------------------------------------------------------------------------------------- photos

for (const input of [$("upload"), $("camera")]) {
  input.addEventListener("change", () => {
    if (input.files && input.files[0]) usePhoto(input.files[0]);
    input.value = "";  // choosing the same file again still fires change
  });
}

const dropZone = $("drop-zone");
dropZone.addEventListener("dragover", (event) => { event.preventDefault(); dropZone.classList.add("dragging"); });
dropZone.addEventListener("dragleave", (event) => {
  if (!dropZone.contains(event.relatedTarget)) dropZone.classList.remove("dragging");
});
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
  const file = event.dataTransfer.files && event.dataTransfer.files[0];
  if (file) usePhoto(file);
});
// A file dropped beside the card would otherwise open in the tab, and the page (and the drawing) would be gone.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

photo.addEventListener("error", () => {
  // not an image, or one this browser cannot show (TIFF in most): the server reads it or says why
  photo.hidden = true;
  if (!state.photo) return;
  state.unshowable = true;
  showPhotoNote();
  boxCtx.clearRect(0, 0, boxes.width, boxes.height);
});

function showPhotoNote() {
  // Where a photo this browser cannot show would be, a note that says what became of it.
  if (!state.photo || !state.unshowable) return;
  const placeholder = $("placeholder");
  placeholder.textContent = {
    pending: "This browser cannot show the photo; it is being read…",
    read: "This browser cannot show the photo, but it was read: see its answer.",
    failed: "This file could not be read: see why in the message.",
  }[state.photoOutcome];
  placeholder.classList.add("note");
  placeholder.hidden = false;
}

async function usePhoto(file) {
  if (file.size === 0) {  // said here, in words for people, not in the API's words for programs
    showError(`${file.name || "that file"} is empty (0 bytes): choose another photo`);  // the answer stays
    return;
  }
  // The last input chosen wins: a photo still being shrunk when another photo is chosen, a stroke is drawn,
  // Clear is pressed or the mode changes is dropped when it is ready (a 48-MP photo takes seconds).
  state.source += 1;  // from now on an answer to what was on the pad is dropped: the photo replaces it
  const source = state.source;
  showEmpty();
  state.strokes = [];
  dropPhoto();
  state.preparing = true;
  redraw();
  inputChanged();
  const shrunk = await shrink(file);
  if (source !== state.source) return;  // replaced while it was being prepared
  state.preparing = false;
  state.photo = shrunk;
  state.photoOutcome = "pending";
  state.photoUrl = URL.createObjectURL(shrunk);
  photo.src = state.photoUrl;
  photo.hidden = false;
  inputChanged();
  schedulePrediction(true);
}

async function shrink(file) {
  // Decode in the browser and re-encode when the photo is big; anything the browser cannot decode is sent
  // as it is, so the server can say what is wrong with it.
  try {
    const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    const scale = UPLOAD_MAX_SIDE / Math.max(bitmap.width, bitmap.height);
    if (scale >= 1 && file.size < 1.5e6) { bitmap.close(); return file; }
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(bitmap.width * Math.min(1, scale));
    canvas.height = Math.round(bitmap.height * Math.min(1, scale));
    const context = canvas.getContext("2d");
    // JPEG has no transparency: a transparent background would turn black and the ink vanish in it. Ink on
    // transparency is ink on paper, as the server reads such a PNG sent as it is.
    context.fillStyle = "#fff";
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    return await new Promise((resolve) => canvas.toBlob((blob) => resolve(blob || file), "image/jpeg", 0.92));
  } catch (error) {
    return file;
  }
}

// ---------------------------------------------------------------------------------------------- the API

function drawingBlob() {
  // The drawing is sent at a quarter of the pad's size for one digit (140x140, five times MNIST's resolution)
  // and half for a number: plenty for the model, and preprocessing a smaller image is several times cheaper.
  const scale = MODES[state.mode].sendScale;
  const small = document.createElement("canvas");
  small.width = Math.round(pad.width * scale);
  small.height = Math.round(pad.height * scale);
  const smallCtx = small.getContext("2d");
  smallCtx.imageSmoothingQuality = "high";
  smallCtx.drawImage(pad, 0, 0, small.width, small.height);
  return new Promise((resolve) => small.toBlob(resolve, "image/png"));
}

function schedulePrediction(now = false) {
  state.dirty = true;
  if (state.inFlight) return;
  const wait = now ? 0 : Math.max(0, MIN_SEND_INTERVAL_MS - (performance.now() - state.lastSent));
  setTimeout(sendPrediction, wait);
}

async function sendPrediction() {
  if (state.inFlight || !state.dirty) return;
  clearTimeout(state.retryTimer);  // this request replaces a pending retry
  state.retryTimer = null;
  const retry = state.retrying;
  state.retrying = false;
  state.dirty = false;
  if (!state.photo && state.strokes.length === 0) { showEmpty(); return; }
  state.inFlight = true;
  state.lastSent = performance.now();
  const generation = state.generation;
  const source = state.source;
  const mode = state.mode;
  // A drawing's answer comes in a few ms, so only a request that takes a while marks the answer on screen
  // as being replaced; the answer, an error or a replaced input clears the mark.
  clearTimeout(state.readingTimer);
  state.readingTimer = setTimeout(() => setReading(source === state.source && mode === state.mode), READING_NOTE_MS);
  try {
    const blob = state.photo || await drawingBlob();
    const body = new FormData();
    body.append("file", blob, state.photo ? (state.photo.name || "photo.jpg") : "drawing.png");
    // While the pen moves, only the digit and its probabilities (a few ms, batched with everyone else's); the
    // 28x28 view and its saliency map (170 forward passes, about 100 ms of a core) come once it lifts. With
    // every update explained, 30 students drawing at once waited 3.3 s for each answer.
    const url = state.mode === "number" ? "/api/read" : state.drawing ? "/api/predict" : "/api/predict?explain=true";
    const response = await fetch(url, { method: "POST", body });
    const answer = await response.json().catch(() => ({ detail: `the server answered ${response.status}` }));
    // an answer to input that was replaced (a photo, Clear, the other mode) or undone to nothing while we waited
    const empty = !state.photo && state.strokes.length === 0;
    if (mode !== state.mode || source !== state.source || empty) return;
    if (response.status === 503) {  // busy, or its image workers restart: the drawing is sent again by itself
      const seconds = retryLater(retry, Number(response.headers.get("Retry-After")));
      showFailure(`the server is busy; trying again in ${seconds} s.`);
      return;
    }
    if (state.unreachable || state.modelUnknown) {  // back after a restart, perhaps with a fine-tuned model:
      state.unreachable = false;                     // name the one now served
      loadModelInfo();
    }
    if (!response.ok) {
      // a photo the browser cannot decode (a scanner's TIFF) is sent as it is, unshrunk: say what would go through
      const unshrinkable = response.status === 413 && state.photo && !photo.naturalWidth
        ? " This browser cannot make a smaller copy of this kind of file: save it as JPEG or PNG first." : "";
      showFailure((answer.detail || `the server answered ${response.status}`) + unshrinkable);
      if (state.photo) { state.photoOutcome = "failed"; showPhotoNote(); }
      return;
    }
    if (state.photo) { state.photoOutcome = "read"; showPhotoNote(); }
    // An answer to the drawing before its last stroke or undo is shown while the next one is on its way, but
    // a correction must send the image on the pad: it waits for that answer.
    const current = generation === state.generation;
    state.lastBlob = current ? blob : null;
    if (state.mode === "digit") showPrediction(answer, current); else showReading(answer);
  } catch (error) {
    if (mode !== state.mode || source !== state.source) return;  // the next send says what it finds
    // stopped or restarting (a new model): ask again, further apart each time, until it answers
    state.unreachable = true;
    const seconds = retryLater(retry);
    showFailure(`could not reach the server; trying again in ${seconds} s. Is digitrec serve still running?`);
  } finally {
    state.inFlight = false;
    clearTimeout(state.readingTimer);
    setReading(false);
    if (state.dirty) schedulePrediction();
  }
}

function setReading(reading) {
  // "Reading…" over the answer on screen (dimmed) while the input's own answer is on its way.
  resultCard.classList.toggle("reading", reading);
  $("reading").hidden = !reading;
  resultCard.setAttribute("aria-busy", String(reading));
}

function retryLater(afterRetry, retryAfter) {
  // Send the current input again in `retryAfter` seconds (a 503's Retry-After), else in 1 s, or twice as long
  // as the last retry waited when that retry failed too; returns the wait in seconds. Without this a student's
  // drawing stayed unread, under an error, until they drew another stroke.
  const backoff = afterRetry ? Math.min(state.retryDelay * 2, MAX_RETRY_S) : 1;
  state.retryDelay = retryAfter > 0 ? Math.min(retryAfter, MAX_RETRY_S) : backoff;
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(() => {
    state.retryTimer = null;
    state.retrying = true;
    schedulePrediction(true);
  }, state.retryDelay * 1000);
  return state.retryDelay;
}

async function sendCorrection(label, button) {
  if (!state.lastBlob || state.drawing) return;
  const sent = state.lastBlob;
  const body = new FormData();
  body.append("file", sent, "correction.png");
  body.append("label", String(label));
  const predicted = state.lastPrediction && state.lastPrediction.digit;
  if (predicted !== null && predicted !== undefined) body.append("predicted", String(predicted));
  setCorrectionEnabled(false);
  const hadFocus = document.activeElement === button;
  keepFocus(button);  // the pressed button is now disabled: the keyboard focus goes to Upload, not the page's start
  const retry = () => {
    // only over the image it was about: after Clear or another drawing the buttons stayed on, doing nothing
    if (sent !== state.lastBlob) return;
    setCorrectionEnabled(true);
    if (hadFocus && document.activeElement === $("upload")) button.focus();  // back where it was, to try again
  };
  try {
    const response = await fetch("/api/feedback", { method: "POST", body });
    const answer = await response.json().catch(() => ({ detail: `the server answered ${response.status}` }));
    if (!response.ok) { showError(answer.detail); retry(); return; }
    toast(`Thanks! Saved as ${withArticle(answer.label)} (correction #${answer.id}). It will help train the next model.`);
  } catch (error) {
    showError("could not save the correction; is the server still running?");
    retry();
  }
}

// ---------------------------------------------------------------------------------------------- showing answers

const bars = $("bars");
const barFills = [], barPcts = [];
for (let d = 0; d < 10; d++) {
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.dataset.digit = d;
  bar.innerHTML = '<span class="pct"></span><div class="fill"></div>';
  bars.appendChild(bar);
  barFills.push(bar.querySelector(".fill"));
  barPcts.push(bar.querySelector(".pct"));
}
const barLabels = document.createElement("div");
barLabels.className = "bar-labels";
barLabels.setAttribute("aria-hidden", "true");  // the bars' own label names the digits; these are for the eye
barLabels.innerHTML = [...Array(10).keys()].map((d) => `<span>${d}</span>`).join("");
bars.after(barLabels);

const correctButtons = $("correct-buttons");
for (let d = 0; d < 10; d++) {
  const button = document.createElement("button");
  button.textContent = d;
  button.dataset.label = d;
  button.title = `It is ${withArticle(d)}`;
  button.addEventListener("click", () => sendCorrection(d, button));
  correctButtons.appendChild(button);
}

function setCorrectionEnabled(enabled) {
  const predicted = state.lastPrediction && state.lastPrediction.digit;
  for (const button of correctButtons.children) {
    button.disabled = !enabled || Number(button.dataset.label) === predicted;
  }
}

function withArticle(digit) {  // "a 7", "an 8"
  return `${digit === 8 ? "an" : "a"} ${digit}`;
}

function percent(p) {
  // rounded down from 99.5% on: 0.9996 is "99.9%", never "100.0%", which only a certainty would earn (and a
  // probability of exactly 1, which float32 gives, is shown as 99.9% too)
  p = Math.min(p, 0.999);
  return p >= 0.995 ? `${(Math.floor(p * 1000) / 10).toFixed(1)}%` : `${Math.round(p * 100)}%`;
}

function numberHint() {
  // a photo of a whole number read as one digit is no digit: say where it would read (wider than tall by half)
  return state.photo && photo.naturalHeight > 0 && photo.naturalWidth >= 1.5 * photo.naturalHeight
    ? " A whole number? Choose “A number” above." : "";
}

function hedge(confidence) {
  // an answer that is accepted but far from sure says so in words, not in its percentage alone
  // by the percentage shown beside it: 0.897 shows "90%" and is "It's"
  const shown = Math.round(confidence * 100) / 100;
  return shown >= SURE_FROM ? "It's" : shown >= 0.5 ? "Probably" : "Perhaps";
}

function showPrediction(p, current = true) {
  state.lastPrediction = p;
  hideToast();
  const best = p.probabilities.indexOf(Math.max(...p.probabilities));
  const second = Math.max(...p.probabilities.filter((_, d) => d !== best));
  // A rejected answer whose likeliest digit barely beats the next (every digit near 10%, say) has no best guess.
  const standsOut = p.probabilities[best] - second >= 0.1;
  resultCard.classList.toggle("rejected", p.rejected);
  $("digit").textContent = p.rejected ? "?" : String(p.digit);
  $("verdict").textContent = p.blank
    ? "The image is blank"
    : p.rejected ? "Not sure — this may not be a digit" : `${hedge(p.confidence)} ${withArticle(p.digit)}`;
  $("confidence").textContent = p.blank
    ? "There is no ink in it to read."
    : p.rejected && !standsOut
    ? `No digit stands out: none is more than ${percent(p.probabilities[best])} likely.`
    : p.rejected
    ? `Best guess ${best}, only ${percent(p.probabilities[best])} sure.`
    : `${percent(p.confidence)} sure`;
  if (p.rejected && !p.blank) $("confidence").textContent += numberHint();
  $("correct-label").textContent = p.rejected ? "Tell us what it is: a" : "That's wrong, it is a";
  if (p.blank) clearBars();  // rejected whatever the model says of it: its probabilities mean nothing
  else showBars(p.probabilities, p.rejected && !standsOut ? -1 : best);
  if (p.input) paintSeen(p.input, p.saliency);
  const corner = $("pad-answer");
  corner.textContent = p.rejected ? "?" : String(p.digit);
  if (!p.rejected) corner.append(Object.assign(document.createElement("small"), { textContent: percent(p.confidence) }));
  corner.hidden = false;
  // a blank image teaches nothing (the server refuses it as a correction); an answer to an older drawing waits
  setCorrectionEnabled(!p.blank && current);
}

function showBars(probabilities, best) {
  probabilities.forEach((prob, d) => {
    barFills[d].style.height = `${Math.max(0, prob) * 85}%`;  // the rest leaves room for the label
    barPcts[d].textContent = prob >= 0.01 ? percent(prob) : "";
    bars.children[d].classList.toggle("top", d === best);
  });
  // Read out are the likeliest three that have a bar worth a label (1% or more), at least the likeliest one:
  // "7: 99.9%", not "7: 99.9%, 4: 0%, 1: 0%".
  const ranked = [...probabilities.keys()].sort((i, j) => probabilities[j] - probabilities[i]);
  const named = ranked.slice(0, 3).filter((d, i) => i === 0 || probabilities[d] >= 0.01);
  bars.setAttribute("aria-label", "Probability of each digit: " +
    named.map((d) => `${d}: ${percent(probabilities[d])}`).join(", "));
}

function clearBars() {
  barFills.forEach((fill) => { fill.style.height = "0"; });
  barPcts.forEach((pct) => { pct.textContent = ""; });
  [...bars.children].forEach((bar) => bar.classList.remove("top"));
  bars.setAttribute("aria-label", "Probability of each digit");
}

function paintSeen(input, saliency) {
  const seen = $("seen").getContext("2d");
  const why = $("saliency").getContext("2d");
  const a = seen.createImageData(28, 28);
  const b = why.createImageData(28, 28);
  for (let y = 0; y < 28; y++) {
    for (let x = 0; x < 28; x++) {
      const i = (y * 28 + x) * 4;
      const v = input[y][x] * 255;
      a.data[i] = a.data[i + 1] = a.data[i + 2] = v;
      a.data[i + 3] = 255;
      // The input dimmed, then red (pushed toward the answer) or blue (pushed away) on top.
      const s = saliency ? Math.max(-1, Math.min(1, saliency[y][x] * 1.6)) : 0;
      const base = v * 0.3;
      const color = s >= 0 ? [235, 64, 52] : [66, 133, 244];
      const w = Math.abs(s);
      b.data[i] = base * (1 - w) + color[0] * w;
      b.data[i + 1] = base * (1 - w) + color[1] * w;
      b.data[i + 2] = base * (1 - w) + color[2] * w;
      b.data[i + 3] = 255;
    }
  }
  seen.putImageData(a, 0, 0);
  why.putImageData(b, 0, 0);
}

function showReading(answer) {
  hideToast();
  $("number").textContent = answer.number || "–";
  fitNumber();
  const doubtful = answer.digits.filter((d) => d.doubtful).length;  // under the model's reject threshold
  const lines = (answer.lines || []).length;  // a photo of several numbers, one under another
  const leftOut = answer.rejected_lines || 0;  // lines of marks that read as no digits (noise, letters)
  $("number-verdict").textContent = answer.digits.length
    ? `${answer.digits.length} digit${answer.digits.length === 1 ? "" : "s"} found` +
      (lines > 1 ? ` in ${lines} lines` : "") +
      (doubtful ? `, ${doubtful} of them doubtful (orange)` : "") +
      (leftOut ? `; ${leftOut} line${leftOut === 1 ? "" : "s"} of other marks left out` : "")
    : leftOut
      ? "No digits found: what is there does not read as digits."
      : "No digits found. Write bigger, or use a darker pen.";
  const chips = $("chips");
  chips.innerHTML = "";
  answer.digits.forEach((d, i) => {
    if (i > 0 && d.line !== answer.digits[i - 1].line) {
      // each line's digits on a row of their own, as the number shows them
      const gap = document.createElement("li");
      gap.className = "line-break";
      gap.setAttribute("aria-hidden", "true");
      chips.appendChild(gap);
    }
    const li = document.createElement("li");
    li.className = d.doubtful ? "unsure" : "";
    li.innerHTML = `<b>${d.digit}</b>${percent(d.confidence)}`;
    li.setAttribute("aria-label", `${d.digit}, ${percent(d.confidence)} sure${d.doubtful ? ", doubtful" : ""}`);
    chips.appendChild(li);
  });
  drawBoxes(answer.digits);
}

function fitNumber() {
  // A long number is shrunk to fit its line (a wrapped one looked like two numbers: a line break on screen means
  // a line of the photo); past the smallest size it scrolls sideways.
  const number = $("number");
  number.style.fontSize = "";
  if (number.scrollWidth <= number.clientWidth) return;
  const size = parseFloat(getComputedStyle(number).fontSize) * number.clientWidth / number.scrollWidth;
  number.style.fontSize = `${Math.max(16, Math.floor(size))}px`;
}
window.addEventListener("resize", fitNumber);
function reshapePad() {
  // The phone turned: the pad has another shape. A drawing is redrawn in it and read again (its boxes were in the
  // old one's); a photo's boxes are in the photo's own pixels: drawn again, not read again.
  const [width, height] = padShape();
  if (width === pad.width && height === pad.height) return;
  redraw();
  if (state.photo) { if (state.lastDigits) drawBoxes(state.lastDigits); return; }
  inputChanged();
  if (state.strokes.length) schedulePrediction(true);
}
window.addEventListener("resize", () => { if (!state.drawing) reshapePad(); });  // else once the pen lifts

function drawBoxes(digits) {
  state.lastDigits = digits;
  boxCtx.clearRect(0, 0, boxes.width, boxes.height);
  // Boxes are in the uploaded image's pixels: a drawing was sent scaled by sendScale, a photo is shown "contained".
  let scale = 1 / MODES[state.mode].sendScale, dx = 0, dy = 0;
  if (state.photo && !photo.naturalWidth) {  // not shown yet: box it once it is; one it cannot show stays bare
    const source = state.source;
    if (!photo.complete) photo.addEventListener("load", () => { if (source === state.source) drawBoxes(digits); }, { once: true });
    return;
  }
  if (state.photo) {
    scale = Math.min(boxes.width / photo.naturalWidth, boxes.height / photo.naturalHeight);
    dx = (boxes.width - photo.naturalWidth * scale) / 2;
    dy = (boxes.height - photo.naturalHeight * scale) / 2;
  }
  // Labels about 14 CSS px high however small the pad is shown (on a phone the number pad's 30 px font was 8 px),
  // above each box where there is room, else below it, off the digit; inside its top only where neither fits.
  const perCss = boxes.width / (boxes.getBoundingClientRect().width || boxes.width);
  const size = Math.max(14, Math.round(14 * perCss));
  boxCtx.lineWidth = Math.max(2, Math.round(1.5 * perCss));
  boxCtx.font = `bold ${size}px system-ui, sans-serif`;
  for (const d of digits) {
    const [x, y, w, h] = d.box;
    const color = d.doubtful ? "#b25e00" : "#2f6fde";
    boxCtx.strokeStyle = color;
    boxCtx.fillStyle = color;
    const left = dx + x * scale, top = dy + y * scale, bottom = top + h * scale;
    boxCtx.strokeRect(left, top, w * scale, h * scale);
    const label = String(d.digit);
    const tag = size * 1.15;  // the label's background, its text's baseline a fifth of the size above its foot
    const above = top - tag - 2, below = bottom + 2;
    const y0 = above >= 0 ? above : below + tag <= boxes.height ? below : Math.max(0, top);
    boxCtx.fillRect(left - 1, y0, boxCtx.measureText(label).width + 0.5 * size, tag);
    boxCtx.fillStyle = "#fff";
    boxCtx.fillText(label, left - 1 + 0.25 * size, y0 + tag - 0.25 * size);
  }
}

function showEmpty() {
  state.lastPrediction = null;
  state.lastBlob = null;
  resultCard.classList.remove("rejected");
  $("digit").textContent = "–";
  $("verdict").textContent = "Waiting for a digit…";
  $("confidence").textContent = "";
  clearBars();
  for (const id of ["seen", "saliency"]) $(id).getContext("2d").clearRect(0, 0, 28, 28);
  $("number").textContent = "–";
  $("number").style.fontSize = "";
  $("number-verdict").textContent = "Write a few digits side by side.";
  $("chips").innerHTML = "";
  setCorrectionEnabled(false);
  $("pad-answer").hidden = true;
  setReading(false);  // nothing on screen is being replaced now (a request still out for older input is dropped)
  hideToast();
}

// The toast is a live region that is always there, empty when it has nothing to say: one shown from hidden
// together with its text is not announced by every screen reader.
function toast(message, isError = false) {
  const box = $("toast");
  box.textContent = message;
  box.classList.toggle("error", isError);
}
function hideToast() { $("toast").textContent = ""; }

function showFailure(detail) {
  // The answer on screen was about other input: take it down (and with it the corrections) before saying why.
  showEmpty();
  boxCtx.clearRect(0, 0, boxes.width, boxes.height);
  showError(detail);
}
function showError(detail) {
  const text = String(detail || "something went wrong");
  toast(text.charAt(0).toUpperCase() + text.slice(1), true);
}

// ---------------------------------------------------------------------------------------------- modes, start-up

function setMode(mode) {
  state.mode = mode;
  document.body.classList.toggle("number-mode", mode === "number");
  for (const button of document.querySelectorAll(".mode")) {
    const active = button.dataset.mode === mode;
    button.classList.toggle("active", active);
    button.setAttribute("aria-pressed", String(active));
  }
  $("input-title").textContent = MODES[mode].title;
  $("input-hint").textContent = MODES[mode].hint;
  $("placeholder").textContent = MODES[mode].placeholder;
  $("digit-result").hidden = mode !== "digit";
  $("number-result").hidden = mode !== "number";
  clearAll();
}
for (const button of document.querySelectorAll(".mode")) {
  button.addEventListener("click", () => { if (button.dataset.mode !== state.mode) setMode(button.dataset.mode); });
}

async function loadModelInfo() {
  clearTimeout(loadModelInfo.timer);
  try {
    const response = await fetch("/healthz");
    if (!response.ok) throw new Error(`the server answered ${response.status}`);  // 503 while it loads a model
    const health = await response.json();
    const accuracy = health.test_accuracy == null ? "" : ` · ${(health.test_accuracy * 100).toFixed(2)}% on the MNIST test set`;
    $("model-info").textContent = `Model ${health.model} ${health.version}${accuracy}`;
    state.modelUnknown = false;
  } catch (error) {
    // asked again later, and as soon as an answer comes
    $("model-info").textContent = "Model information unavailable";
    state.modelUnknown = true;
    loadModelInfo.timer = setTimeout(loadModelInfo, MODEL_INFO_RETRY_S * 1000);
  }
}

setMode("digit");
loadModelInfo();
