// The attention explorer's page (plain JavaScript, no library): it reads the JSON that attention_ref.viz.explorer
// wrote into <script id="explorer-data"> (Explorer.page_data), takes the maps and the view on show from
// explorerMaps (explorer_maps.js, before this file in the page's script), draws the chosen map on canvases
// and wires the controls.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("explorer-data").textContent);
  const maps = explorerMaps(data);
  const { bytesOf, colours, layers, tokens, stepCount, state } = maps; // the data, and the view on show
  const { weight, pixelAt, currentMap, sharedTop, scaleRange, colourIndex, fmt } = maps; // what the view shows
  const $ = (id) => document.getElementById(id);
  const PANEL = 360; // CSS pixels of a panel's longer side

  // ----- drawing -------------------------------------------------------------------------------
  const cells = document.createElement("canvas"); // the map at its own resolution, one cell a pixel

  // image i of an array of h×w RGB images, in colour or grey, on a canvas of its own
  function imageCanvas(img, inGrey, i = 0) {
    const rgb = bytesOf(img.rgb).subarray(3 * img.width * img.height * i);
    const c = document.createElement("canvas");
    [c.width, c.height] = [img.width, img.height];
    const out = new ImageData(img.width, img.height);
    for (let p = 0; p < img.width * img.height; p++) {
      const [r, g, b] = [rgb[3 * p], rgb[3 * p + 1], rgb[3 * p + 2]];
      const y = 0.299 * r + 0.587 * g + 0.114 * b; // luminance
      out.data.set(inGrey ? [y, y, y, 255] : [r, g, b, 255], 4 * p);
    }
    c.getContext("2d").putImageData(out, 0, 0);
    return c;
  }
  // The left panel's image and the grey one under the map: the step's image when the page has one per step.
  const picture = data.stepImages || data.image;
  const pictures = [];
  function imagesAt(step) {
    if (!picture) return { image: null, grey: null };
    const i = data.stepImages ? step : 0;
    if (!pictures[i]) pictures[i] = { image: imageCanvas(picture, false, i), grey: imageCanvas(picture, true, i) };
    return pictures[i];
  }

  // Both panels' size: the image's shape, or the map's when there is no image.
  function panelSize(L) {
    const [h, w] = picture ? [picture.height, picture.width] : L.grid;
    return w >= h ? [PANEL, Math.round((PANEL * h) / w)] : [Math.round((PANEL * w) / h), PANEL];
  }

  function resize(canvas, [w, h]) {
    if (canvas.width !== w || canvas.height !== h) [canvas.width, canvas.height] = [w, h];
    return canvas.getContext("2d");
  }

  function drawBackdrop(ctx, source, [w, h]) {
    ctx.globalAlpha = 1;
    // smooth a large image as it shrinks; enlarge a small one pixel by pixel, as it is
    ctx.imageSmoothingEnabled = Boolean(source) && source.width > w;
    if (source) ctx.drawImage(source, 0, 0, w, h);
    else {
      ctx.fillStyle = "#3a3a3a";
      ctx.fillRect(0, 0, w, h);
    }
  }

  function drawMap(m, lo, hi, size) {
    const [H, W] = m.L.grid;
    [cells.width, cells.height] = [W, H];
    const rgba = new ImageData(W, H);
    m.values.forEach((v, n) => {
      const i = colourIndex(v, lo, hi);
      rgba.data.set([colours[3 * i], colours[3 * i + 1], colours[3 * i + 2], 255], 4 * n);
    });
    cells.getContext("2d").putImageData(rgba, 0, 0);
    const ctx = resize($("map"), size);
    drawBackdrop(ctx, imagesAt(state.step).grey, size);
    ctx.globalAlpha = state.opacity;
    ctx.imageSmoothingEnabled = false; // each cell a sharp rectangle: the map at its true resolution
    ctx.drawImage(cells, 0, 0, size[0], size[1]);
    ctx.globalAlpha = 1;
  }

  // × on a pixel of grid (H, W), drawn over a canvas of size [w, h]
  function cross(ctx, [r, c], [H, W], [w, h], colour) {
    const [x, y] = [((c + 0.5) * w) / W, ((r + 0.5) * h) / H];
    const s = Math.min(14, Math.max(5, Math.min(w / W, h / H) * 0.4)); // half the arm
    ctx.lineCap = "round";
    for (const [width, stroke] of [[5, "#000"], [2.5, colour]]) {
      ctx.lineWidth = width;
      ctx.strokeStyle = stroke;
      ctx.beginPath();
      ctx.moveTo(x - s, y - s);
      ctx.lineTo(x + s, y + s);
      ctx.moveTo(x + s, y - s);
      ctx.lineTo(x - s, y + s);
      ctx.stroke();
    }
  }

  function drawMarks(m, size) {
    const [H, W] = m.L.grid;
    const imageMarks = resize($("image-marks"), size);
    const mapMarks = resize($("map-marks"), size);
    for (const ctx of [imageMarks, mapMarks]) ctx.clearRect(0, 0, size[0], size[1]);
    if (m.L.queryPixels) {
      // ○ on every query pixel the layer keeps: white on black, visible on any image
      const radius = Math.min(12, Math.max(5, Math.min(size[0] / W, size[1] / H) * 0.3));
      for (const [r, c] of m.L.queryPixels) {
        for (const [width, stroke] of [[4, "#000"], [2, "#fff"]]) {
          imageMarks.lineWidth = width;
          imageMarks.strokeStyle = stroke;
          imageMarks.beginPath();
          imageMarks.arc(((c + 0.5) * size[0]) / W, ((r + 0.5) * size[1]) / H, radius, 0, 2 * Math.PI);
          imageMarks.stroke();
        }
      }
    }
    const colour = state.pinned ? "#ff3df5" : "#33e0ff";
    cross(imageMarks, m.pixel, [H, W], size, colour);
    cross(mapMarks, m.pixel, [H, W], size, colour);
  }

  // What the scale's ends are, in words, for the sentence under the colour bar.
  function scaleWords(m) {
    if (state.scale !== "shared") return data.scales[state.scale];
    const { count } = sharedTop(m);
    const head = state.head >= 0 ? ` (head ${state.head})` : "";
    const where = [
      stepCount > 1 ? `at any of the ${stepCount} steps` : "",
      count > 1 ? `in any of the ${count} ${m.L.kind}-attention layers${head}` : "",
    ].filter(Boolean);
    const whose = m.L.kind === "cross" ? `any pixel gives “${tokens[state.word]}”` : "of this query pixel";
    if (!where.length) return `0 to the largest weight ${whose} (the only map of its kind on this page)`;
    return `0 to the largest weight ${whose} ${where.join(", ")}, so that maps compare across steps and ` +
      "layers and a map near uniform stays dark";
  }

  function drawColourBar(m, lo, hi) {
    const bar = $("bar").getContext("2d");
    const strip = new ImageData(256, 1);
    for (let i = 0; i < 256; i++) strip.data.set([colours[3 * i], colours[3 * i + 1], colours[3 * i + 2], 255], 4 * i);
    bar.putImageData(strip, 0, 0);
    $("ticks").replaceChildren(
      ...[0, 0.25, 0.5, 0.75, 1].map((f) => {
        const span = document.createElement("span");
        span.style.left = `${100 * f}%`;
        span.textContent = fmt(lo + f * (hi - lo));
        return span;
      })
    );
    // uniform attention, 1/M over the M keys: the weight of a map with no structure at all
    const M = m.L.keys;
    const uniform = 1 / M;
    const at = hi > lo ? (uniform - lo) / (hi - lo) : NaN;
    const mark = $("uniform-mark");
    mark.hidden = !(at >= 0 && at <= 1);
    mark.style.left = `${100 * (at >= 0 && at <= 1 ? at : 0)}%`;
    mark.title = `uniform: 1/${M} = ${fmt(uniform)}`;
    const where = mark.hidden ? `, off this scale` : "";
    const what = m.L.kind === "self" ? "the query's weight on each pixel" : "each pixel's weight on the word";
    $("scale-label").textContent =
      `Colour: ${what}; the scale runs from ${scaleWords(m)} (${fmt(lo)} to ${fmt(hi)}). ` +
      `▼ over the bar: uniform attention, 1/${M} = ${fmt(uniform)}${where}.`;
    $("scale-label").dataset.uniform = String(uniform);
  }

  // ----- words and text ------------------------------------------------------------------------
  function drawWords(m) {
    const buttons = $("prompt").children;
    const n = m.pixel[0] * m.L.grid[1] + m.pixel[1];
    for (let t = 0; t < buttons.length; t++) {
      buttons[t].classList.toggle("active", m.L.kind === "cross" && t === state.word);
      buttons[t].querySelector("small").textContent = m.L.kind === "cross" ? fmt(weight(m.L, n, t)) : "";
    }
  }

  function describe(m) {
    const L = m.L;
    const [H, W] = L.grid;
    let best = 0;
    let sum = 0;
    m.values.forEach((v, n) => {
      sum += v;
      if (v > m.values[best]) best = n;
    });
    const top = `(${Math.floor(best / W)}, ${best % W})`;
    let head = state.head >= 0 ? `head ${state.head}` : `mean of ${L.heads} heads`;
    if (L.headMean) head = "mean of the heads (as stored)";
    else if (L.heads === 1) head = "1 head";
    const step = data.steps.length ? `, ${stepText(state.step)}` : "";
    const where = `layer ${L.name} (${H}×${W}), ${head}${step}`;
    const pin = state.pinned ? " (pinned)" : "";
    if (L.kind === "self") {
      const kept = L.queryPixels ? ` This layer keeps the rows of ${L.queries} query pixels (○); the nearest is shown.` : "";
      return (
        `Self-attention of query pixel (${m.pixel[0]}, ${m.pixel[1]})${pin} in ${where}: its ${H * W} weights ` +
        `sum to ${sum.toFixed(3)}; the largest, ${fmt(m.values[best])}, is on pixel ${top}.${kept}`
      );
    }
    return (
      `Cross-attention of the word “${tokens[state.word]}” (token ${state.word}) in ${where}: the weight each ` +
      `pixel gives it; the largest, ${fmt(m.values[best])}, is at pixel ${top}. Under the words: the ` +
      `weights of pixel (${m.pixel[0]}, ${m.pixel[1]})${pin}, which sum to 1 over the ${L.keys} tokens.`
    );
  }

  function describePointer(m) {
    if (!state.pointer) return "Point at the map to read a weight.";
    const [r, c] = pixelAt(m.L, state.pointer);
    return `Under the pointer: pixel (${r}, ${c}), weight ${fmt(m.values[r * m.L.grid[1] + c])}.`;
  }

  // ----- the whole page ------------------------------------------------------------------------
  function render() {
    const m = currentMap();
    const [lo, hi] = scaleRange(m);
    const size = panelSize(m.L);
    drawBackdrop(resize($("image"), size), imagesAt(state.step).image, size);
    drawMap(m, lo, hi, size);
    drawMarks(m, size);
    drawColourBar(m, lo, hi);
    drawWords(m);
    $("readout").textContent = describe(m);
    $("hover").textContent = describePointer(m);
    // what is on show, readable from the page (the tests compare it with the library's weights)
    const map = $("map");
    map.dataset.values = JSON.stringify(Array.from(m.values));
    map.dataset.range = JSON.stringify([lo, hi]);
    map.dataset.grid = JSON.stringify(m.L.grid);
    map.dataset.pixel = JSON.stringify(m.pixel);
    map.dataset.word = m.L.kind === "cross" ? String(state.word) : "";
    map.dataset.layer = String(state.layer);
    map.dataset.step = String(state.step);
    map.dataset.scale = state.scale;
  }

  // "step 25/25 (t = 0)": the step's place on the slider and its label
  function stepText(s) {
    return `step ${s + 1}/${stepCount} (${data.steps[s]})`;
  }

  // ----- controls ------------------------------------------------------------------------------
  function option(select, value, text) {
    const o = document.createElement("option");
    [o.value, o.textContent] = [String(value), text];
    select.append(o);
  }

  function setLayer(i) {
    state.layer = i;
    const L = layers[i];
    $("layer").value = String(i);
    const head = $("head");
    head.replaceChildren();
    if (L.headMean) option(head, -1, "mean of heads (as stored)");
    else if (L.heads === 1) option(head, -1, "the only head");
    else {
      option(head, -1, `mean of ${L.heads} heads`);
      for (let h = 0; h < L.heads; h++) option(head, h, `head ${h}`);
    }
    if (state.head >= (L.headMean ? 0 : L.heads)) state.head = -1;
    head.value = String(state.head);
    const words = $("scale").querySelector('option[value="words"]');
    words.disabled = L.kind !== "cross";
    if (words.disabled && state.scale === "words") state.scale = $("scale").value = "max";
  }

  layers.forEach((L, i) => option($("layer"), i, `${L.name} · ${L.kind}-attention · ${L.grid[0]}×${L.grid[1]}`));
  for (const [key, text] of Object.entries(data.scales)) option($("scale"), key, text);
  if (data.steps.length > 1) {
    $("step").max = String(data.steps.length - 1);
    $("step").value = String(state.step);
    $("step-label").textContent = stepText(state.step);
  } else $("step-box").hidden = true;
  if (!picture) $("opacity-box").hidden = true;
  if (data.stepImages) $("image-label").textContent = `${data.stepImages.label}. `;
  if (!tokens.length) $("prompt-box").hidden = true;
  tokens.forEach((text, t) => {
    const b = document.createElement("button");
    b.className = data.special[t] ? "word special" : "word";
    b.type = "button";
    b.dataset.index = String(t);
    b.append(text, document.createElement("small"));
    b.addEventListener("click", () => {
      state.word = t;
      // on a self-attention layer a word shows a cross-attention layer, at the same grid when there is one
      const L = layers[state.layer];
      if (L.kind !== "cross") {
        const crossLayers = layers.map((K, i) => [K, i]).filter(([K]) => K.kind === "cross");
        const same = crossLayers.find(([K]) => K.grid[0] === L.grid[0] && K.grid[1] === L.grid[1]);
        if (crossLayers.length) setLayer((same || crossLayers[0])[1]);
      }
      render();
    });
    $("prompt").append(b);
  });

  $("layer").addEventListener("change", (e) => { setLayer(Number(e.target.value)); render(); });
  $("head").addEventListener("change", (e) => { state.head = Number(e.target.value); render(); });
  $("scale").addEventListener("change", (e) => { state.scale = e.target.value; render(); });
  $("opacity").addEventListener("input", (e) => { state.opacity = Number(e.target.value); render(); });
  $("step").addEventListener("input", (e) => {
    state.step = Number(e.target.value);
    $("step-label").textContent = stepText(state.step);
    render();
  });

  // the pointer's fractional (y, x) on a panel's canvas
  function position(e, canvas) {
    const box = canvas.getBoundingClientRect();
    const clamp = (v) => Math.min(1, Math.max(0, v));
    return [clamp((e.clientY - box.top) / box.height), clamp((e.clientX - box.left) / box.width)];
  }
  function samePixel(a, b) {
    const [p, q] = [pixelAt(layers[state.layer], a), pixelAt(layers[state.layer], b)];
    return p[0] === q[0] && p[1] === q[1];
  }
  const imageStack = $("image-stack");
  imageStack.addEventListener("mousemove", (e) => {
    if (state.pinned) return;
    state.query = position(e, $("image"));
    render();
  });
  imageStack.addEventListener("click", (e) => {
    const pos = position(e, $("image"));
    state.pinned = !(state.pinned && samePixel(pos, state.query));
    state.query = pos;
    render();
  });
  const mapStack = $("map-stack");
  mapStack.addEventListener("mousemove", (e) => { state.pointer = position(e, $("map")); render(); });
  mapStack.addEventListener("mouseleave", () => { state.pointer = null; render(); });

  // "How to read this page" opens on the first visit. Where the page cannot keep a note (storage
  // refused, e.g. in a sandboxed frame) it opens every time: better once too often than never.
  const SEEN = "attention_ref.explorer.help-seen";
  try {
    if (!window.localStorage.getItem(SEEN)) {
      $("help").open = true;
      window.localStorage.setItem(SEEN, "1");
    }
  } catch (err) {
    $("help").open = true;
  }

  setLayer(state.layer);
  $("scale").value = state.scale;
  $("opacity").value = String(state.opacity);
  render();
  // drawn: the signal tests (and anyone scripting the page) wait for
  document.documentElement.dataset.ready = "true";
  window.explorerReady = true;
})();
