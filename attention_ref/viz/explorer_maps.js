// The attention explorer's numbers (plain JavaScript, no library): the page's data decoded, the view on show
// (layer, head, step, query position, word, colour scale), the map that view selects, and the ends of its
// colour scale. explorer.js draws them and wires the controls; attention_ref.viz.explorer puts this file and
// then explorer.js into the page's one <script>. Weights are float32 (steps, heads, queries, keys), row-major;
// pixel n of an H×W map is row n / W, column n % W.
"use strict";
function explorerMaps(data) {
  // ----- data ----------------------------------------------------------------------------------
  // base64 → bytes; the arrays were written little-endian, the byte order of every browser's platform
  function bytesOf(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  const colours = bytesOf(data.colours); // 256 × (R, G, B)
  const layers = data.layers;
  function weightsOf(L) {
    if (!L.w) L.w = new Float32Array(bytesOf(L.weights).buffer); // decoded on first use
    return L.w;
  }
  const tokens = data.tokens;
  const stepCount = Math.max(1, data.steps.length);

  // the first view (Explorer.start_view): a layer, a step, a word and a colour scale
  const state = {
    layer: data.start.layer,
    head: -1, // -1: the mean over the heads
    step: data.start.step,
    scale: data.start.scale,
    query: data.startQuery.slice(), // fractional (y, x): the same place at every grid
    pinned: false,
    word: data.start.word,
    opacity: 1, // the map alone, so that its colours are the colour bar's; lower it to see the image under it
    pointer: null, // fractional (y, x) of the pointer over the map, for the value under it
  };

  // w[step, head, q, k], or its mean over the heads when head is -1
  function weightAt(L, step, head, q, k) {
    const w = weightsOf(L);
    const at = (h) => w[((step * L.heads + h) * L.queries + q) * L.keys + k];
    if (head >= 0) return at(head);
    let sum = 0;
    for (let h = 0; h < L.heads; h++) sum += at(h);
    return sum / L.heads;
  }
  // the weight on show: the chosen step and head
  function weight(L, q, k) {
    return weightAt(L, state.step, state.head, q, k);
  }

  function pixelAt(L, pos) {
    const [H, W] = L.grid;
    return [Math.min(H - 1, Math.floor(pos[0] * H)), Math.min(W - 1, Math.floor(pos[1] * W))];
  }

  // The row of a self-attention layer for the query position: the pixel under it, or, when the
  // layer keeps only some rows, the one whose pixel centre is nearest.
  function queryRow(L) {
    const [H, W] = L.grid;
    if (!L.queryPixels) {
      const [r, c] = pixelAt(L, state.query);
      return { row: r * W + c, pixel: [r, c] };
    }
    let best = 0;
    let bestDistance = Infinity;
    L.queryPixels.forEach(([r, c], i) => {
      const d = ((r + 0.5) / H - state.query[0]) ** 2 + ((c + 0.5) / W - state.query[1]) ** 2;
      if (d < bestDistance) [best, bestDistance] = [i, d];
    });
    return { row: best, pixel: L.queryPixels[best] };
  }

  // The map on show: its H·W values, row-major, and what they are.
  function currentMap() {
    const L = layers[state.layer];
    const N = L.grid[0] * L.grid[1];
    const values = new Float64Array(N);
    if (L.kind === "self") {
      const { row, pixel } = queryRow(L);
      for (let k = 0; k < N; k++) values[k] = weight(L, row, k); // the query's row
      return { L, values, pixel };
    }
    for (let n = 0; n < N; n++) values[n] = weight(L, n, state.word); // the word's column
    return { L, values, pixel: pixelAt(L, state.query) };
  }

  // The head a layer shows for the shared scale: the mean when the mean is on show, else head
  // state.head in the layers that have it (null: a layer without it, left out of the scale).
  function sharedHead(K) {
    if (state.head < 0) return -1;
    return !K.headMean && state.head < K.heads ? state.head : null;
  }

  // The largest weight of the word (cross) or of the query pixel's rows (self) at every step, in every
  // layer of the kind on show: the top of the "shared" scale, so that maps compare across steps and layers.
  function sharedTop(m) {
    let hi = 0;
    let count = 0;
    layers.forEach((K) => {
      const head = K === m.L ? state.head : sharedHead(K);
      if (K.kind !== m.L.kind || head === null) return;
      count += 1;
      const N = K.grid[0] * K.grid[1];
      const row = K.kind === "self" ? queryRow(K).row : 0;
      for (let s = 0; s < stepCount; s++) {
        if (K.kind === "self") for (let k = 0; k < N; k++) hi = Math.max(hi, weightAt(K, s, head, row, k));
        else for (let n = 0; n < N; n++) hi = Math.max(hi, weightAt(K, s, head, n, state.word));
      }
    });
    return { hi, count };
  }

  // The ends [lo, hi] of the colour scale (data.scales says what each choice means).
  function scaleRange(m) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const v of m.values) [lo, hi] = [Math.min(lo, v), Math.max(hi, v)];
    if (state.scale === "unit") return [0, 1];
    if (state.scale === "minmax") return [lo, hi];
    if (state.scale === "shared") return [0, sharedTop(m).hi];
    if (state.scale === "words") {
      for (let t = 0; t < m.L.keys; t++)
        for (let n = 0; n < m.values.length; n++) hi = Math.max(hi, weight(m.L, n, t));
    }
    return [0, hi];
  }

  // the colour table's entry for v: t = (v − lo) / (hi − lo) in [0, 1] → entry min(⌊256 t⌋, 255)
  function colourIndex(v, lo, hi) {
    if (!(hi > lo)) return 0;
    return Math.min(255, Math.max(0, Math.floor(((v - lo) / (hi - lo)) * 256)));
  }

  function fmt(v) {
    if (v === 0) return "0";
    return Math.abs(v) >= 0.001 ? v.toPrecision(3) : v.toExponential(2);
  }

  // what explorer.js draws from: the data, the view on show, the map it selects and its colour scale
  return { bytesOf, colours, layers, tokens, stepCount, state, weight, pixelAt, currentMap, sharedTop, scaleRange,
    colourIndex, fmt };
}
