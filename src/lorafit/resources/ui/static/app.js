// lorafit ui: a little JavaScript for the server-rendered pages. Every state-changing request
// is a JSON (or raw upload) POST carrying the page's CSRF token in a header, which a
// cross-site page cannot send.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

async function post(url, body, raw = false) {
  const headers = { "X-CSRF-Token": csrf() };
  headers["Content-Type"] = raw ? "application/octet-stream" : "application/json";
  const response = await fetch(url, { method: "POST", headers, body: raw ? body : JSON.stringify(body) });
  let data = {};
  try { data = await response.json(); } catch (e) { data = { error: response.statusText }; }
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function say(id, text, bad = false) {
  const box = document.getElementById(id);
  if (!box) return;
  box.textContent = text;
  box.className = bad ? "notice bad" : "notice";
  box.hidden = !text;
}

function busy(button, on) {
  if (!button) return;
  button.disabled = on;
  button.setAttribute("aria-busy", on ? "true" : "false");
}

// A line chart of one or more series as inline SVG: no chart library.
function lineChart(svg, series, yLabel) {
  const width = 640, height = 240, pad = 36;
  const points = series.flatMap((s) => s.points);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  if (!points.length) { svg.innerHTML = `<text x="${pad}" y="${height / 2}">no steps yet</text>`; return; }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = 0, y1 = Math.max(...ys) * 1.05 || 1;
  const X = (x) => pad + ((x - x0) / (x1 - x0)) * (width - 2 * pad);
  const Y = (y) => height - pad - ((y - y0) / (y1 - y0)) * (height - 2 * pad);
  let out = `<line x1="${pad}" y1="${height - pad}" x2="${width - pad}" y2="${height - pad}" class="axis"/>`;
  out += `<line x1="${pad}" y1="${pad / 2}" x2="${pad}" y2="${height - pad}" class="axis"/>`;
  out += `<text x="${pad}" y="${pad / 2 - 4}" class="label">${yLabel} (max ${y1.toFixed(2)})</text>`;
  out += `<text x="${width - pad}" y="${height - 8}" class="label" text-anchor="end">step ${x1}</text>`;
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    out += `<path d="${d}" class="${s.cls}"><title>${s.name}</title></path>`;
  }
  svg.innerHTML = out;
}
