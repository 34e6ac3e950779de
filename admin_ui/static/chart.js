// Charts as plain inline SVG built with DOM calls: a few hundred lines we own instead of a
// charting library (tens to hundreds of KB, often needing inline styles or eval that the
// console's CSP forbids). Each chart scales to its card through its viewBox.

import { compact, el, svg } from "./lib.js";

export const PALETTE = [
  "#2456c9", "#d9480f", "#2b8a3e", "#9c36b5", "#c2255c", "#0b7285", "#e67700", "#5c940d",
];
const W = 760;
const H = 260;
const PAD = { left: 64, right: 24, top: 12, bottom: 34 };

function niceMax(value) {
  if (value <= 4) return 4; // whole-number ticks for small counts
  const step = 10 ** Math.floor(Math.log10(value));
  for (const factor of [1, 2, 2.5, 5, 10]) {
    if (factor * step >= value) return factor * step;
  }
  return 10 * step;
}

function frame(label, max, format) {
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, class: "chart",
    preserveAspectRatio: "xMidYMid meet",
  });
  const innerH = H - PAD.top - PAD.bottom;
  for (let i = 0; i <= 4; i += 1) {
    const y = PAD.top + innerH - (innerH * i) / 4;
    root.append(
      svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y, class: "grid" }),
      svg("text", { x: PAD.left - 6, y: y + 4, class: "axis", "text-anchor": "end" },
        format((max * i) / 4)),
    );
  }
  return root;
}

function xLabels(root, labels, x, every) {
  labels.forEach((label, i) => {
    if (i % every === 0 || i === labels.length - 1) {
      const anchor = i === labels.length - 1 && labels.length > 1 ? "end" : "middle";
      root.append(svg("text", { x: x(i), y: H - 12, class: "axis", "text-anchor": anchor },
        label));
    }
  });
}

// Per x (a day): two bars, input then output tokens, each stacked by series (adapters).
// values: Map(seriesName -> Map(x -> {in, out})).
export function pairedStackedBars(label, xs, xLabel, names, values) {
  const totals = xs.map((x) => {
    let input = 0;
    let output = 0;
    for (const name of names) {
      const v = values.get(name)?.get(x);
      input += v?.in ?? 0;
      output += v?.out ?? 0;
    }
    return Math.max(input, output);
  });
  const max = niceMax(Math.max(0, ...totals));
  const root = frame(label, max, compact);
  const innerW = W - PAD.left - PAD.right;
  const innerH = H - PAD.top - PAD.bottom;
  const slot = innerW / Math.max(xs.length, 1);
  const barW = Math.max(Math.min(slot * 0.38, 28), 1.5);
  const scale = (v) => (v / max) * innerH;
  xs.forEach((x, i) => {
    const center = PAD.left + slot * (i + 0.5);
    ["in", "out"].forEach((kind, side) => {
      let top = PAD.top + innerH;
      names.forEach((name, s) => {
        const v = values.get(name)?.get(x)?.[kind] ?? 0;
        if (!v) return;
        const h = scale(v);
        top -= h;
        root.append(svg("rect", {
          x: side ? center + 1 : center - barW - 1, y: top, width: barW, height: Math.max(h, 0.5),
          fill: PALETTE[s % PALETTE.length], class: kind === "out" ? "bar out" : "bar",
        }, svg("title", {}, `${x} ${name}: ${v.toLocaleString("en-US")} tokens ${kind}`)));
      });
    });
  });
  xLabels(root, xs.map(xLabel), (i) => PAD.left + slot * (i + 0.5), Math.ceil(xs.length / 10));
  return root;
}

// Lines over x labels; series: [{name, values: [number|null]}]; nulls break a line.
export function lines(label, xLabelsText, series, format, axisFormat = compact) {
  const all = series.flatMap((s) => s.values.filter((v) => v != null));
  const max = niceMax(Math.max(0, ...all));
  const root = frame(label, max, axisFormat);
  const innerW = W - PAD.left - PAD.right;
  const innerH = H - PAD.top - PAD.bottom;
  const n = Math.max(xLabelsText.length - 1, 1);
  const x = (i) => PAD.left + (innerW * i) / n;
  const y = (v) => PAD.top + innerH - (v / max) * innerH;
  series.forEach((s, k) => {
    const color = PALETTE[k % PALETTE.length];
    let run = [];
    const flush = () => {
      if (run.length > 1) {
        root.append(svg("polyline", { points: run.join(" "), stroke: color, class: "line" }));
      }
      run = [];
    };
    s.values.forEach((v, i) => {
      if (v == null) { flush(); return; }
      run.push(`${x(i).toFixed(1)},${y(v).toFixed(1)}`);
      root.append(svg("circle", { cx: x(i), cy: y(v), r: 3, fill: color },
        svg("title", {}, `${xLabelsText[i]} ${s.name}: ${format(v)}`)));
    });
    flush();
  });
  xLabels(root, xLabelsText, x, Math.ceil(xLabelsText.length / 8));
  return root;
}

export function legend(names, extra = []) {
  return el("ul", { className: "legend" },
    ...names.map((name, i) => el("li", {},
      el("span", { className: `swatch c${i % PALETTE.length}` }), name)),
    ...extra.map((text) => el("li", { className: "muted" }, text)));
}
