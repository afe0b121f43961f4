// hwexp drawing pad: pointer strokes -> POST /api/predict -> top-5 candidates.
// Strokes are kept in units of the canvas side ([0, 1]) and sent in CSS pixels with the
// canvas size; the server renders and preprocesses them exactly as the training data.
"use strict";

(() => {
  const DEBOUNCE_MS = 150; // after a stroke ends, before asking the server
  const MIN_STEP = 0.002; // of the side: closer pointer samples are skipped
  const $ = (id) => document.getElementById(id);
  const canvas = $("pad");
  const ctx = canvas.getContext("2d");
  const list = $("candidates");

  const state = {
    models: [],
    model: null, // the selected model's description from /api/models
    strokes: [], // [[[x, y], ...], ...] in units of the side
    pointer: null, // id of the pointer drawing now
    side: 0, // canvas side, CSS px
    dpr: 1,
    seq: 0, // request sequence: stale answers are dropped
    timer: 0,
  };

  // ------------------------------------------------------------------ drawing

  function penWidth() {
    return state.model ? state.model.stroke_width : 0.036;
  }

  function setupContext() {
    const scale = state.side * state.dpr;
    ctx.setTransform(scale, 0, 0, scale, 0, 0);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.strokeStyle = "#1d2129";
    ctx.fillStyle = "#1d2129";
    ctx.lineWidth = penWidth();
  }

  function drawDot([x, y]) {
    ctx.beginPath();
    ctx.arc(x, y, penWidth() / 2, 0, 2 * Math.PI);
    ctx.fill();
  }

  function drawSegment(a, b) {
    ctx.beginPath();
    ctx.moveTo(a[0], a[1]);
    ctx.lineTo(b[0], b[1]);
    ctx.stroke();
  }

  function drawStroke(points) {
    if (points.length === 1) return drawDot(points[0]);
    ctx.beginPath();
    ctx.moveTo(points[0][0], points[0][1]);
    for (const [x, y] of points.slice(1)) ctx.lineTo(x, y);
    ctx.stroke();
  }

  function redraw() {
    ctx.save();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.restore();
    setupContext();
    state.strokes.forEach(drawStroke);
  }

  function resize() {
    const rect = canvas.getBoundingClientRect();
    state.side = rect.width;
    state.dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(rect.width * state.dpr);
    canvas.height = Math.round(rect.height * state.dpr);
    redraw();
  }

  function pointOf(event) {
    const rect = canvas.getBoundingClientRect();
    return [(event.clientX - rect.left) / rect.width, (event.clientY - rect.top) / rect.height];
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (state.pointer !== null || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    state.pointer = event.pointerId;
    const point = pointOf(event);
    state.strokes.push([point]);
    clearTimeout(state.timer);
    drawDot(point);
    changed();
  });

  canvas.addEventListener("pointermove", (event) => {
    if (event.pointerId !== state.pointer) return;
    const stroke = state.strokes[state.strokes.length - 1];
    const samples = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const sample of samples.length ? samples : [event]) {
      const point = pointOf(sample);
      const last = stroke[stroke.length - 1];
      if (Math.hypot(point[0] - last[0], point[1] - last[1]) < MIN_STEP) continue;
      stroke.push(point);
      drawSegment(last, point);
    }
  });

  function endStroke(event) {
    if (event.pointerId !== state.pointer) return;
    state.pointer = null;
    recogniseSoon(DEBOUNCE_MS);
  }

  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);
  canvas.addEventListener("lostpointercapture", endStroke);

  // ------------------------------------------------------------------ actions

  function changed() {
    const empty = state.strokes.length === 0;
    $("undo").disabled = empty;
    $("clear").disabled = empty;
    $("recognise").disabled = empty || !state.model;
    $("hint").classList.toggle("hidden", !empty);
  }

  function undo() {
    if (!state.strokes.length || state.pointer !== null) return;
    state.strokes.pop();
    redraw();
    changed();
    recogniseSoon(0);
  }

  function clear() {
    if (state.pointer !== null) return;
    state.strokes = [];
    redraw();
    changed();
    recogniseSoon(0);
  }

  function recogniseSoon(delay) {
    clearTimeout(state.timer);
    state.seq += 1; // any answer in flight now describes an older drawing
    state.timer = setTimeout(recognise, delay);
  }

  function requestBody() {
    const side = Math.max(1, Math.round(state.side));
    const round = (v) => Math.round(v * side * 10) / 10;
    return {
      model: state.model.name,
      strokes: state.strokes.map((s) => s.map(([x, y]) => [round(x), round(y)])),
      width: side,
      height: side,
    };
  }

  async function recognise() {
    clearTimeout(state.timer);
    const seq = ++state.seq;
    const strokes = state.strokes.length;
    if (!strokes || !state.model) {
      showCandidates([], 0);
      setStatus("");
      return;
    }
    setStatus("Recognising…");
    try {
      const response = await fetch("/api/predict", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(requestBody()),
      });
      const answer = await response.json();
      if (seq !== state.seq) return;
      if (!response.ok) {
        setStatus(answer.error || `Error ${response.status}`, true);
        return;
      }
      showCandidates(answer.candidates, strokes);
      $("input").src = `data:image/png;base64,${answer.input_png}`;
      setStatus(`${answer.model} · ${answer.ms.toFixed(1)} ms on the server`);
    } catch (error) {
      if (seq === state.seq) setStatus(`The server did not answer (${error.message})`, true);
    }
  }

  // ------------------------------------------------------------------ results

  function showCandidates(candidates, strokes) {
    list.replaceChildren(
      ...candidates.map(({ char, probability }) => {
        const item = document.createElement("li");
        const button = document.createElement("button");
        button.type = "button";
        button.title = `Copy ${char}`;
        const percent = (probability * 100).toFixed(1);
        button.innerHTML =
          '<span class="char"></span><span class="bar"><span></span></span><span class="pct"></span>';
        button.querySelector(".char").textContent = char;
        button.querySelector(".bar span").style.width = `${Math.max(0.5, probability * 100)}%`;
        button.querySelector(".pct").textContent = `${percent}%`;
        button.addEventListener("click", () => copy(char));
        item.append(button);
        return item;
      }),
    );
    list.dataset.strokes = String(strokes);
    $("empty").classList.toggle("hidden", candidates.length > 0);
  }

  function setStatus(text, error = false) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", error);
  }

  function toast(text) {
    const box = $("toast");
    box.textContent = text;
    box.classList.add("show");
    clearTimeout(box.timer);
    box.timer = setTimeout(() => box.classList.remove("show"), 1400);
  }

  async function copy(char) {
    try {
      await navigator.clipboard.writeText(char);
    } catch {
      // Not a secure context (e.g. a phone on http://<LAN address>): the old way.
      const area = document.createElement("textarea");
      area.value = char;
      area.style.position = "fixed";
      area.style.opacity = "0";
      document.body.append(area);
      area.select();
      const done = document.execCommand("copy");
      area.remove();
      if (!done) return toast(`Could not copy ${char}`);
    }
    toast(`Copied ${char}`);
  }

  // ------------------------------------------------------------------ models

  function selectModel(name) {
    state.model = state.models.find((m) => m.name === name) || state.models[0];
    for (const button of $("models").children) {
      button.setAttribute("aria-checked", String(button.dataset.name === state.model.name));
    }
    const m = state.model;
    $("model-info").textContent = `${m.classes} characters · ${m.input_size}×${m.input_size}`;
    const reads = [
      m.class_set,
      m.data_source && `trained on ${m.data_source}`,
      m.version && `version ${m.version}`,
    ]
      .filter(Boolean)
      .join(", ");
    $("model-info").title = `${reads ? `${reads}: ` : ""}${m.preview}… from ${m.source}`;
    redraw();
    changed();
    if (state.strokes.length) recogniseSoon(0);
  }

  async function loadModels() {
    try {
      const response = await fetch("/api/models");
      const answer = await response.json();
      state.models = answer.models;
      $("models").replaceChildren(
        ...state.models.map((m) => {
          const button = document.createElement("button");
          button.type = "button";
          button.setAttribute("role", "radio");
          button.dataset.name = m.name;
          button.title = `${m.preview}… (${m.classes} characters)`;
          button.textContent = m.name;
          const count = document.createElement("small");
          count.textContent = m.classes;
          button.append(count);
          button.addEventListener("click", () => selectModel(m.name));
          return button;
        }),
      );
      selectModel(answer.default);
      document.body.dataset.ready = "true";
    } catch (error) {
      setStatus(`Could not load the models (${error.message})`, true);
    }
  }

  $("undo").addEventListener("click", undo);
  $("clear").addEventListener("click", clear);
  $("recognise").addEventListener("click", recognise);
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
      event.preventDefault();
      undo();
    } else if (event.key === "Escape") {
      clear();
    } else if (event.key === "Enter" && event.target === document.body) {
      recognise();
    }
  });

  new ResizeObserver(resize).observe(canvas);
  resize();
  changed();
  loadModels();
})();
