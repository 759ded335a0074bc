/* mmcst report: pseudo-masks and threshold curves drawn in the page from the data embedded in it. */
(function () {
  "use strict";
  var SVG_NS = "http://www.w3.org/2000/svg"; // the SVG namespace name, not a resource

  function decode(b64) {
    var text = atob(b64), bytes = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return bytes;
  }

  function decimals(step) {
    var text = String(step);
    return text.indexOf(".") < 0 ? 0 : text.length - text.indexOf(".") - 1;
  }

  function snap(value, grid) {
    var n = Math.round((value - grid[0]) / grid[2]);
    var last = Math.round((grid[1] - grid[0]) / grid[2]);
    n = Math.max(0, Math.min(last, n));
    return Number((grid[0] + n * grid[2]).toFixed(decimals(grid[2])));
  }

  /* The evaluation's rule: argmax over [background plane = t, class maps]; ties go to background
     (strict ">", and the first class wins ties between classes, as numpy's argmax). */
  function pseudoMask(entry, t) {
    var n = entry.height * entry.width, keys = entry.keys, px = entry.pixels, out = new Uint8Array(n);
    for (var p = 0; p < n; p++) {
      var best = t, label = 0;
      for (var k = 0; k < keys.length; k++) {
        var v = px[k * n + p] / 255;
        if (v > best) { best = v; label = keys[k] + 1; }
      }
      out[p] = label;
    }
    return out;
  }

  function heat(entry, cls) {
    var n = entry.height * entry.width, keys = entry.keys, px = entry.pixels, out = new Uint8Array(n);
    for (var k = 0; k < keys.length; k++) {
      if (cls >= 0 && keys[k] + 1 !== cls) continue;
      for (var p = 0; p < n; p++) if (px[k * n + p] > out[p]) out[p] = px[k * n + p];
    }
    return out;
  }

  function drawLabels(canvas, labels, width, height, palette, cls) {
    canvas.width = width; canvas.height = height;
    var context = canvas.getContext("2d", {willReadFrequently: true}), image = context.createImageData(width, height), d = image.data;
    for (var p = 0; p < labels.length; p++) {
      var label = labels[p], colour = palette[label];
      if (cls >= 0 && label !== 0 && label !== cls) colour = [70, 74, 82]; // other classes greyed out
      d[4 * p] = colour[0]; d[4 * p + 1] = colour[1]; d[4 * p + 2] = colour[2]; d[4 * p + 3] = 255;
    }
    context.putImageData(image, 0, 0);
  }

  function drawHeat(canvas, values, width, height, lut) {
    canvas.width = width; canvas.height = height;
    var context = canvas.getContext("2d", {willReadFrequently: true}), image = context.createImageData(width, height), d = image.data;
    for (var p = 0; p < values.length; p++) {
      var colour = lut[values[p]];
      d[4 * p] = colour[0]; d[4 * p + 1] = colour[1]; d[4 * p + 2] = colour[2];
      d[4 * p + 3] = Math.round(70 + 185 * values[p] / 255);
    }
    context.putImageData(image, 0, 0);
  }

  function clear(canvas) {
    canvas.width = 1; canvas.height = 1;
    canvas.getContext("2d", {willReadFrequently: true}).clearRect(0, 0, 1, 1);
  }

  function niceStep(range, count) {
    var raw = range / count, power = Math.pow(10, Math.floor(Math.log10(raw)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * power >= raw) return steps[i] * power;
    return 10 * power;
  }

  function el(name, attributes, parent) {
    var node = document.createElementNS(SVG_NS, name);
    for (var key in attributes) node.setAttribute(key, attributes[key]);
    if (parent) parent.appendChild(node);
    return node;
  }

  function valueAt(curve, t) {
    var best = null, distance = Infinity;
    for (var i = 0; i < curve.length; i++) {
      var dx = Math.abs(curve[i][0] - t);
      if (dx < distance) { distance = dx; best = curve[i][1]; }
    }
    return best;
  }

  function bestPoint(curve) {
    var best = null;
    curve.forEach(function (p) { if (p[1] !== null && (best === null || p[1] > best[1])) best = p; });
    return best;
  }

  function Chart(figure, spec, onPickThreshold, onPickMethod) {
    var svg = figure.querySelector("[data-chart]"), legend = figure.querySelector("[data-legend]");
    var W = 460, H = 280, left = 46, right = 14, top = 12, bottom = 40;
    var grid = spec.grid, series = spec.methods.filter(function (m) { return m.curve.length; });
    var ymax = 0;
    series.forEach(function (m) { m.curve.forEach(function (p) { if (p[1] !== null) ymax = Math.max(ymax, p[1]); }); });
    var ystep = niceStep(Math.max(ymax, 1) * 1.05, 5);
    ymax = Math.max(ystep, Math.ceil(Math.max(ymax, 1) * 1.05 / ystep) * ystep);
    function x(t) { return left + (t - grid[0]) / (grid[1] - grid[0] || 1) * (W - left - right); }
    function y(v) { return H - bottom - v / ymax * (H - top - bottom); }
    function t(px) { return grid[0] + (px - left) / (W - left - right) * (grid[1] - grid[0]); }

    var xstep = niceStep(grid[1] - grid[0] || 1, 8);
    for (var v = 0; v <= ymax + 1e-9; v += ystep) {
      el("line", {x1: left, x2: W - right, y1: y(v), y2: y(v), "class": "grid"}, svg);
      el("text", {x: left - 6, y: y(v) + 4, "text-anchor": "end"}, svg).textContent = Number(v.toFixed(2));
    }
    for (var u = grid[0]; u <= grid[1] + 1e-9; u += xstep) {
      el("line", {x1: x(u), x2: x(u), y1: top, y2: H - bottom, "class": "grid"}, svg);
      el("text", {x: x(u), y: H - bottom + 15, "text-anchor": "middle"}, svg).textContent = Number(u.toFixed(2));
    }
    el("line", {x1: left, x2: W - right, y1: H - bottom, y2: H - bottom, "class": "axis"}, svg);
    el("line", {x1: left, x2: left, y1: top, y2: H - bottom, "class": "axis"}, svg);
    el("text", {x: (left + W - right) / 2, y: H - 6, "text-anchor": "middle", "class": "axis-title"}, svg).textContent =
      "background threshold t";
    el("text", {x: 12, y: (top + H - bottom) / 2, "text-anchor": "middle", "class": "axis-title",
      transform: "rotate(-90 12 " + (top + H - bottom) / 2 + ")"}, svg).textContent = "mIoU (%)";

    var now = el("line", {y1: top, y2: H - bottom, "class": "now"}, svg);
    var drawn = series.map(function (m) {
      var group = el("g", {}, svg), path = "", pen = false;
      m.curve.forEach(function (p) {
        if (p[1] === null) { pen = false; return; }
        path += (pen ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1);
        pen = true;
      });
      var line = el("path", {d: path, fill: "none", stroke: m.colour, "stroke-linejoin": "round"}, group);
      var peak = bestPoint(m.curve);
      if (m.mctformer && m.mctformer[1] !== null) // MCTformer's early-stopped point: a square
        el("rect", {x: x(m.mctformer[0]) - 4, y: y(m.mctformer[1]) - 4, width: 8, height: 8, fill: "none",
          stroke: m.colour, "stroke-width": 1.5}, group);
      if (peak) el("circle", {cx: x(peak[0]), cy: y(peak[1]), r: 4.5, fill: "#fff", stroke: m.colour, "stroke-width": 2}, group);
      var dot = el("circle", {r: 4, fill: m.colour, stroke: "#fff", "stroke-width": 1.5}, group);
      var item = document.createElement("li"), swatch = document.createElement("span"),
          name = document.createElement("span"), value = document.createElement("span");
      swatch.className = "swatch"; swatch.style.background = m.colour;
      name.textContent = m.name + (m.reference ? " (reference)" : "");
      value.className = "value";
      item.appendChild(swatch); item.appendChild(name); item.appendChild(value);
      item.addEventListener("click", function () { onPickMethod(spec.methods.indexOf(m)); });
      legend.appendChild(item);
      return {method: m, group: group, line: line, dot: dot, item: item, value: value, peak: peak};
    });

    function pick(event) {
      var point = svg.createSVGPoint();
      point.x = event.clientX; point.y = event.clientY;
      onPickThreshold(t(point.matrixTransform(svg.getScreenCTM().inverse()).x));
    }
    svg.addEventListener("pointerdown", function (event) { svg.setPointerCapture(event.pointerId); pick(event); });
    svg.addEventListener("pointermove", function (event) { if (event.buttons) pick(event); });

    this.update = function (state) {
      var selected = spec.methods[state.method];
      now.setAttribute("x1", x(state.t)); now.setAttribute("x2", x(state.t));
      drawn.forEach(function (s) {
        var here = valueAt(s.method.curve, state.t), active = s.method === selected;
        s.line.setAttribute("stroke-width", active ? 2.8 : 1.6);
        s.group.setAttribute("opacity", active ? 1 : 0.55);
        if (active) svg.appendChild(s.group); // drawn last: on top
        s.dot.setAttribute("visibility", here === null ? "hidden" : "visible");
        if (here !== null) { s.dot.setAttribute("cx", x(state.t)); s.dot.setAttribute("cy", y(here)); }
        s.item.classList.toggle("selected", active);
        s.value.textContent = (here === null ? "n/a" : here.toFixed(1)) + " at t" +
          (s.peak ? " · best " + s.peak[1].toFixed(1) + " at " + s.peak[0].toFixed(2) : "");
      });
    };
  }

  function Explorer(root, spec) {
    spec.methods.forEach(function (m) {
      (m.maps || []).concat(m.labels || []).forEach(function (entry) { entry.pixels = decode(entry.data); });
    });
    var method = root.querySelector("[data-control=method]"), cls = root.querySelector("[data-control=class]"),
        slider = root.querySelector("[data-control=threshold]"), readout = root.querySelector("[data-readout=threshold]"),
        bestButton = root.querySelector("[data-action=best]"), figure = root.querySelector(".chart"),
        rows = Array.prototype.slice.call(root.querySelectorAll("[data-image-index]"));
    var dec = decimals(spec.grid[2]);
    var state = {method: 0, cls: -1, t: snap(parseFloat(root.getAttribute("data-threshold")), spec.grid)};
    var chart = figure ? new Chart(figure, spec, setThreshold, setMethod) : null;

    function setThreshold(t) { state.t = snap(t, spec.grid); slider.value = state.t.toFixed(dec); render(); }
    function setMethod(index) { state.method = index; if (method) method.value = String(index); render(); }

    function render() {
      var m = spec.methods[state.method];
      root.setAttribute("data-threshold", state.t.toFixed(dec));
      root.setAttribute("data-method", m.name);
      root.setAttribute("data-class", String(state.cls));
      readout.textContent = state.t.toFixed(dec);
      slider.disabled = m.kind === "labels";
      bestButton.disabled = m.kind === "labels" || m.threshold === null;
      rows.forEach(function (row, i) {
        var mapCanvas = row.querySelector("[data-layer=map]"), maskCanvas = row.querySelector("[data-layer=mask]");
        if (m.kind === "maps") {
          var entry = m.maps[i];
          drawLabels(maskCanvas, pseudoMask(entry, state.t), entry.width, entry.height, spec.palette, state.cls);
          drawHeat(mapCanvas, heat(entry, state.cls), entry.width, entry.height, spec.colormap);
        } else if (m.kind === "labels") {
          var labels = m.labels[i];
          drawLabels(maskCanvas, labels.pixels, labels.width, labels.height, spec.palette, state.cls);
          clear(mapCanvas);
        } else {
          clear(maskCanvas); clear(mapCanvas);
        }
      });
      var maskLabel = root.querySelector("[data-label=mask]");
      if (maskLabel) maskLabel.textContent = m.kind === "labels" ? "label map" : "mask at t = " + state.t.toFixed(dec);
      if (chart) chart.update(state);
    }

    if (method) method.addEventListener("change", function () { state.method = parseInt(method.value, 10); render(); });
    if (cls) cls.addEventListener("change", function () { state.cls = parseInt(cls.value, 10); render(); });
    slider.addEventListener("input", function () { setThreshold(parseFloat(slider.value)); });
    bestButton.addEventListener("click", function () {
      var m = spec.methods[state.method];
      if (m.threshold !== null) setThreshold(m.threshold);
    });
    render();
  }

  var data = JSON.parse(document.getElementById("report-data").textContent);
  Array.prototype.forEach.call(document.querySelectorAll("[data-explorer]"), function (root) {
    new Explorer(root, data.explorers[root.getAttribute("data-explorer")]);
  });
})();
