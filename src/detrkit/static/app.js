// The detrkit page: send an image to POST /predict, draw the answer over it, filter it by score.
// Every candidate detection is asked for once (threshold 0); the slider then filters what is
// drawn and listed here, in the page, without a new request. Nothing is loaded from elsewhere.
"use strict";

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#ffd92f", "#bcbd22", "#17becf"];  // as detrkit.visualize
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

let model = null;   // GET /model
let answer = null;  // the last POST /predict answer
let sent = 0;       // numbers the uploads, so a late answer to an older one is dropped

function threshold() { return Number($("threshold").value); }

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadModel() {
  const response = await fetch("/model");
  model = await response.json();
  const input = model.input.max_size ? `${model.input.image_size} px (longer side at most ${model.input.max_size})`
                                     : `${model.input.image_size} px`;
  $("model").textContent = `${model.weights}: ${model.preset || "custom model"}, ${model.classes.length} classes, `
    + `${model.backend} on ${model.device}, ${model.precision}, images resized to ${input}`;
  $("threshold").value = model.threshold;
  showThreshold();
}

async function upload(file) {
  const mine = ++sent;
  setStatus(`sending ${file.name}…`);
  $("image").src = URL.createObjectURL(file);
  const limit = model ? model.max_detections : 100;
  let body;
  try {
    const response = await fetch(`/predict?threshold=0&max_detections=${limit}`, {
      method: "POST", body: file, headers: {"Content-Type": file.type || "application/octet-stream"}});
    body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  } catch (error) {
    if (mine === sent) { answer = null; clearBoxes(); setStatus(`${file.name}: ${error.message}`, true); }
    return;
  }
  if (mine !== sent) return;
  answer = body;
  $("stage").hidden = false;
  draw();
}

function clearBoxes() {
  $("boxes").replaceChildren();
  $("json").textContent = "{}";
}

function shown() {
  const t = threshold();
  return answer.detections.filter((d) => d.score > t);  // "above", as the server filters
}

function draw() {
  if (!answer) return;
  const {width, height} = answer.image;
  const svg = $("boxes");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  // As wide as the column allows, at most 70 % of the window's height; the boxes scale with it.
  $("stage").style.width = `min(100%, ${(70 * width / height).toFixed(2)}vh)`;
  const detections = shown();
  // Captions 13 screen pixels high, whatever the image's scale on screen (SVG units are image pixels).
  const font = 13 * width / Math.max(1, svg.getBoundingClientRect().width);
  svg.replaceChildren(...detections.map((d) => boxElement(d, font)));
  $("json").textContent = JSON.stringify({...answer, threshold: threshold(), detections}, null, 1);
  setStatus(`${detections.length} of ${answer.detections.length} detections above ${threshold().toFixed(2)}; `
    + `${width} x ${height} px; model ${answer.model_ms} ms (batch of ${answer.batch})`);
}

function boxElement(d, font) {
  const [x0, y0, x1, y1] = d.box;
  const color = PALETTE[Math.abs(d.label) % PALETTE.length];
  const g = document.createElementNS(SVG, "g");
  g.setAttribute("class", "det");
  g.dataset.label = d.label;
  g.dataset.name = d.name;
  g.dataset.score = d.score;
  g.dataset.box = JSON.stringify(d.box);
  const rect = document.createElementNS(SVG, "rect");
  Object.entries({class: "box", x: x0, y: y0, width: x1 - x0, height: y1 - y0, stroke: color})
    .forEach(([k, v]) => rect.setAttribute(k, v));
  const caption = `${d.name} ${d.score.toFixed(2)}`;
  const band = document.createElementNS(SVG, "rect");
  Object.entries({class: "band", x: x0, y: y0, width: caption.length * font * 0.6 + font / 2, height: font * 1.3,
                  fill: color})
    .forEach(([k, v]) => band.setAttribute(k, v));
  const text = document.createElementNS(SVG, "text");
  Object.entries({x: x0 + font / 4, y: y0 + font / 6, "font-size": font}).forEach(([k, v]) => text.setAttribute(k, v));
  text.textContent = caption;
  const title = document.createElementNS(SVG, "title");
  title.textContent = `${caption} [${d.box.map((v) => v.toFixed(1)).join(", ")}]`;
  g.append(rect, band, text, title);
  return g;
}

function showThreshold() { $("threshold-value").textContent = threshold().toFixed(2); }

function pick(files) {
  if (files && files.length) upload(files[0]);
}

document.addEventListener("DOMContentLoaded", () => {
  loadModel().catch((error) => setStatus(`cannot read /model: ${error.message}`, true));
  $("file").addEventListener("change", (event) => pick(event.target.files));
  $("threshold").addEventListener("input", () => { showThreshold(); draw(); });
  window.addEventListener("resize", draw);
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    pick(event.dataTransfer.files);
  });
});
