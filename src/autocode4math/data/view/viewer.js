// The trajectory viewer of `autocode view` (autocode4math/view.py writes the data this script reads).
// No framework and no network: it decodes the embedded data, filters the rows in memory and renders
// one page of them at a time; a trajectory's detail is built only when it is opened.
"use strict";

const state = {
  tab: "list", page: 0, pageSize: 50, search: "", question: null, compareQ: null,
  filters: {}, open: new Set(),
};
let D = null;        // the decoded data
let rows = [];       // row objects
let visible = [];    // indices of rows that pass the filters
let haystacks = null; // lower-cased text per row, built on the first search

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  return fill(node, children);
}

function put(node, ...children) {  // replace a node's children (arrays flattened, null and false skipped)
  node.replaceChildren();
  return fill(node, children);
}

function fill(node, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

async function decode() {
  const node = document.getElementById("data");
  if (node.dataset.encoding !== "gzip") return JSON.parse(node.textContent);
  if (typeof DecompressionStream === "undefined") {
    throw new Error("this browser cannot inflate the embedded data (no DecompressionStream); rebuild the page with --no-compress");
  }
  const bin = atob(node.textContent.trim());
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return JSON.parse(await new Response(stream).text());
}

function toRows(data) {
  const f = data.fields;
  return data.rows.map((a) => {
    const r = {};
    for (let i = 0; i < f.length; i++) r[f[i]] = a[i];
    r.statuses = r.blocks.map((b) => data.strings[b[0]]);
    return r;
  });
}

const S = (i) => (i === null || i === undefined ? "" : D.strings[i]);
const Q = (r) => D.questions[r.q];
const pct = (x) => (x === null || x === undefined || Number.isNaN(x) ? "-" : (100 * x).toFixed(1) + "%");
const num = (x, d) => (x === null || x === undefined ? "-" : Number(x).toFixed(d));

// --- filters ---

function distinct(values) {
  return [...new Set(values)].sort((a, b) => String(a).localeCompare(String(b), undefined, { numeric: true }));
}

function filterSpecs() {
  const specs = [];
  const two = D.runs.length > 1;
  if (two) specs.push(["run", "run", D.runs.map((r, i) => [String(i), "AB"[i] + ": " + r]), (r, v) => D.sources[r.src].run === +v]);
  specs.push(["source", "source", D.sources.map((s, i) => [String(i), `${s.name} (${s.kind}, ${s.n})`]), (r, v) => r.src === +v]);
  specs.push(["bench", "benchmark", distinct(D.questions.map((q) => q[0])).map((b) => [b, b]), (r, v) => Q(r)[0] === v]);
  specs.push(["mode", "mode", distinct(rows.map((r) => S(r.mode))).map((m) => [m, m]), (r, v) => S(r.mode) === v]);
  const metaKeys = distinct(D.questions.flatMap((q) => Object.keys(q[4])));
  for (const key of metaKeys) {
    const values = distinct(D.questions.map((q) => q[4][key]).filter((v) => v !== undefined).map(String));
    if (values.length > 1 && values.length <= 60) {
      specs.push(["meta-" + key, key, values.map((v) => [v, v]), (r, v) => String(Q(r)[4][key]) === v]);
    }
  }
  specs.push(["correct", "grade", [["1", "correct"], ["0", "wrong"]], (r, v) => r.correct === +v]);
  specs.push(["code", "code", [["1", "used code"], ["0", "no code"]], (r, v) => (r.calls > 0) === (v === "1")]);
  specs.push(["c", "decision c", [["1", "c = 1"], ["0", "c = 0"]], (r, v) => r.c === +v]);
  const statuses = distinct(rows.flatMap((r) => r.statuses));
  if (statuses.length) specs.push(["status", "sandbox status", statuses.map((s) => [s, s]), (r, v) => r.statuses.includes(v)]);
  const gstats = distinct(rows.filter((r) => r.gstat !== null).map((r) => S(r.gstat)));
  if (gstats.length) specs.push(["gstat", "grade status", gstats.map((s) => [s, s]), (r, v) => S(r.gstat) === v]);
  specs.push(["finish", "finish", distinct(rows.map((r) => S(r.finish))).map((s) => [s, s]), (r, v) => S(r.finish) === v]);
  const dis = [["1", "cot ≠ code (decisive question)"], ["2", "auto chose the worse"]];
  if (two) dis.push(["4", "runs differ"]);
  specs.push(["disagree", "disagreements", dis, (r, v) => (r.flags & +v) !== 0]);
  if (rows.some((r) => r.chosen !== null)) {
    specs.push(["chosen", "E-step", [["1", "subsampled"], ["0", "not subsampled"]], (r, v) => r.chosen === +v]);
  }
  return specs;
}

let SPECS = [];

function applyFilters() {
  const active = SPECS.filter(([id]) => state.filters[id]);
  const needle = state.search.trim().toLowerCase();
  if (needle && !haystacks) haystacks = rows.map(haystack);
  visible = [];
  for (let i = 0; i < rows.length; i++) {
    const r = rows[i];
    if (state.question !== null && r.q !== state.question) continue;
    if (!active.every(([id, , , test]) => test(r, state.filters[id]))) continue;
    if (needle && !haystacks[i].includes(needle)) continue;
    visible.push(i);
  }
}

function haystack(r) {
  const q = Q(r);
  return [q[1], q[2], q[3], r.pred || "", ...r.spans.map((s) => s[1])].join("\n").toLowerCase();
}

function renderFilters() {
  const box = el("section", { id: "filters" });
  for (const [id, label, options] of SPECS) {
    const select = el("select", { id: "f-" + id, onchange: (e) => { state.filters[id] = e.target.value; refresh(true); } },
      el("option", { value: "", text: "all" }), options.map(([v, t]) => el("option", { value: v, text: t })));
    select.value = state.filters[id] || "";
    box.append(el("label", {}, label, select));
  }
  let timer = null;
  const search = el("input", {
    id: "f-search", type: "search", placeholder: "search question, answer, text, code", value: state.search,
    oninput: (e) => { clearTimeout(timer); timer = setTimeout(() => { state.search = e.target.value; refresh(true); }, 150); },
  });
  box.append(el("label", { class: "grow" }, "search", search));
  box.append(el("button", { id: "f-clear", onclick: () => {
    state.filters = {}; state.search = ""; state.question = null; render();
  } }, "clear filters"));
  return box;
}

// --- rendering ---

function render() {
  const app = document.getElementById("app");
  put(app, header(), tabs(), renderFilters(), el("div", { id: "stats" }), el("div", { id: "main" }));
  refresh(true);
}

function header() {
  const kinds = D.sources.map((s) => `${s.name} [${s.kind}] ${s.n}`);
  return el("header", {},
    el("h1", { text: "autocode view" }),
    el("div", { class: "runs" }, D.runs.map((r, i) => el("div", {}, (D.runs.length > 1 ? "AB"[i] + ": " : "run: ") + r))),
    el("details", {}, el("summary", { text: `${D.sources.length} sources, ${rows.length} trajectories, ${D.questions.length} questions` }),
      el("ul", {}, kinds.map((k) => el("li", { text: k })))),
    el("div", { class: "legend" }, el("span", { class: "model", text: "model-written (mask 1)" }),
      el("span", { class: "tool status-ok", text: "tool-inserted (mask 0)" }), el("span", { class: "prefix", text: "forced prefix (context)" }),
      el("span", { class: "code", text: "code" })));
}

function tabs() {
  const names = [["list", "Trajectories"], ["compare", "Side by side"]];
  if (D.audit.some((a) => Object.keys(a).length)) names.splice(1, 0, ["queries", "E-step queries"]);
  return el("nav", { class: "tabs" }, names.map(([id, label]) =>
    el("button", { id: "tab-" + id, class: state.tab === id ? "on" : "", onclick: () => { state.tab = id; render(); } }, label)));
}

function refresh(resetPage) {
  applyFilters();
  if (resetPage) state.page = 0;
  renderStats();
  const main = document.getElementById("main");
  if (state.tab === "queries") put(main, renderQueries());
  else if (state.tab === "compare") put(main, renderCompare());
  else put(main, renderList());
}

function renderStats() {
  const n = visible.length;
  let ok = 0, code = 0, tokens = 0, calls = 0;
  for (const i of visible) { const r = rows[i]; ok += r.correct; code += r.calls > 0; tokens += r.tokens || 0; calls += r.calls; }
  const stats = document.getElementById("stats");
  const chip = state.question === null ? null : el("span", { class: "chip", id: "question-chip" },
    `question ${Q({ q: state.question })[1]}`, el("button", { onclick: () => { state.question = null; refresh(true); } }, "×"));
  put(stats,
    el("span", { id: "count", "data-count": String(n), "data-search": state.search, text: `${n} of ${rows.length} trajectories` }),
    n ? ` · accuracy ${pct(ok / n)} · used code ${pct(code / n)} · ${num(calls / n, 2)} calls and ${num(tokens / n, 0)} generated tokens per trajectory` : "",
    chip);
}

function pager(total, onchange) {
  const pages = Math.max(1, Math.ceil(total / state.pageSize));
  state.page = Math.min(state.page, pages - 1);
  const go = (p) => () => { state.page = p; onchange(); };
  const size = el("select", { id: "page-size", onchange: (e) => { state.pageSize = +e.target.value; state.page = 0; onchange(); } },
    [25, 50, 100, 200].map((s) => el("option", { value: String(s), text: `${s} per page` })));
  size.value = String(state.pageSize);
  return el("div", { class: "pager" },
    el("button", { id: "prev", disabled: state.page === 0, onclick: go(state.page - 1) }, "‹ prev"),
    el("span", { id: "page", text: ` page ${state.page + 1} of ${pages} ` }),
    el("button", { id: "next", disabled: state.page >= pages - 1, onclick: go(state.page + 1) }, "next ›"), size);
}

function renderList() {
  const box = el("div", { id: "list" });
  const draw = () => {
    const start = state.page * state.pageSize;
    put(box, pager(visible.length, draw),
      visible.slice(start, start + state.pageSize).map((i) => trajectory(i)),
      visible.length > state.pageSize ? pager(visible.length, draw) : null);
  };
  draw();
  return box;
}

function summaryLine(r) {
  const q = Q(r), src = D.sources[r.src];
  return [
    el("span", { class: r.correct ? "mark ok" : "mark bad", text: r.correct ? "✓" : "✗" }),
    el("span", { class: "src", text: src.name }),
    el("span", { text: `${q[0]} · ${q[1]}` }),
    el("span", { class: "mode", text: `${S(r.mode)} #${r.sample}` }),
    el("span", { text: `c=${r.c}` }),
    el("span", { class: "pred", text: `pred ${r.pred === null ? "none" : r.pred} / gold ${q[3]}` }),
    r.blocks.length ? el("span", { class: "calls", text: `${r.calls} call${r.calls === 1 ? "" : "s"} (${r.statuses.join(", ")})` }) : null,
    el("span", { text: `${r.tokens ?? "-"} tok` }),
    r.gstat !== null && S(r.gstat) !== "ok" ? el("span", { class: "bad", text: `grade ${S(r.gstat)}` }) : null,
    r.chosen === 1 ? el("span", { class: "chosen", text: "subsampled" }) : null,
    el("span", { class: "qshort", text: q[2] }),
  ];
}

function trajectory(i) {
  const r = rows[i];
  const node = el("div", { class: "traj", "data-row": String(i) });
  const head = el("div", { class: "traj-head", onclick: () => toggle() }, summaryLine(r),
    el("button", { class: "cmp", title: "this question side by side across modes, sources and runs",
      onclick: (e) => { e.stopPropagation(); state.compareQ = r.q; state.tab = "compare"; render(); } }, "compare"),
    el("button", { class: "only", title: "show only this question",
      onclick: (e) => { e.stopPropagation(); state.question = r.q; refresh(true); } }, "only this question"));
  node.append(head);
  const toggle = () => {
    if (state.open.has(i)) { state.open.delete(i); node.querySelector(".detail")?.remove(); }
    else { state.open.add(i); node.append(detail(r)); }
  };
  if (state.open.has(i)) node.append(detail(r));
  return node;
}

function kv(pairs) {
  return el("dl", { class: "kv" }, pairs.filter(Boolean).map(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
}

function detail(r) {
  const q = Q(r), src = D.sources[r.src];
  const meta = Object.entries(q[4]).map(([k, v]) => `${k}=${v}`).join(", ");
  const grade = [
    ["source", `${src.name} (${src.kind})`], ["mode / sample", `${S(r.mode)} / ${r.sample}`],
    ["decision c", r.c], ["extracted answer", r.pred === null ? "none" : r.pred], ["gold", q[3]],
    ["grade", r.correct ? "correct" : "wrong"],
    r.gstat !== null && ["grade status", S(r.gstat) + (r.gerr ? `: ${r.gerr}` : "")],
    ["finish", S(r.finish)], ["tokens", `${r.tokens ?? "-"} generated, ${r.ptokens ?? "-"} prompt`],
    meta && ["meta", meta],
    r.adv !== null && ["advantage", num(r.adv, 3)],
    r.chosen !== null && ["subsampled for training", r.chosen ? "yes" : "no"],
  ];
  const audit = D.audit[r.src][q[1]];
  return el("div", { class: "detail" },
    el("div", { class: "question" }, el("b", { text: "Question " }), q[2]),
    kv(grade),
    audit ? estepTable(audit) : null,
    transcript(r));
}

function estepTable(a) {
  const [q0, q1, pi, s0, s1, n0, n1, chosen] = a;
  return el("table", { class: "estep" },
    el("tr", {}, ["", "Q(x,c)", "π(c|x)", "s*(c|x)", "rollouts", ""].map((h) => el("th", { text: h }))),
    el("tr", {}, el("td", { text: "c=0" }), el("td", { text: num(q0, 3) }), el("td", { text: num(1 - pi, 3) }),
      el("td", { text: num(s0, 3) }), el("td", { text: n0 }), el("td", { text: `${chosen} subsampled` })),
    el("tr", {}, el("td", { text: "c=1" }), el("td", { text: num(q1, 3) }), el("td", { text: num(pi, 3) }),
      el("td", { text: num(s1, 3) }), el("td", { text: n1 }), el("td")));
}

const CODE_RE = /```python[ \t]*\n[\s\S]*?```/g;

function modelText(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(CODE_RE)) {
    if (m.index > last) out.push(text.slice(last, m.index));
    out.push(el("span", { class: "code", text: m[0] }));
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function transcript(r) {
  const box = el("div", { class: "transcript" });
  const prefix = S(r.prefix);
  if (prefix) box.append(el("span", { class: "prefix", title: "forced prefix: context, not generated", text: prefix }));
  let block = 0;
  const executed = r.blocks.filter((b) => S(b[0]) !== "not_run");
  for (const [kind, text, tokens] of r.spans) {
    const tok = tokens === null ? "" : ` · ${tokens} tokens`;
    if (kind === 1) {
      const b = executed[block++] || [null, null, ""];
      const label = `tool output · block ${block} · ${S(b[0])}${b[1] === null ? "" : ` · ${num(b[1], 3)} s`}${tok} · mask 0`;
      // a block of its own: the line break before the output is the block's edge, so it is not drawn twice
      box.append(el("span", { class: "tool status-" + S(b[0]), title: label, "data-label": label, text: text.replace(/^\n/, "") }));
      if (b[2]) box.append(el("span", { class: "err", text: b[2] }));
    } else {
      box.append(el("span", { class: kind === 0 ? "model" : "unknown", title: kind === 0 ? `model${tok} · mask 1` : "spans not found", }, modelText(text)));
    }
  }
  for (const b of r.blocks.filter((b) => S(b[0]) === "not_run")) {
    box.append(el("div", { class: "note", text: `last code block not run: ${b[2] || "not_run"}` }));
  }
  return box;
}

// --- E-step queries ---

function renderQueries() {
  const items = [];
  const srcFilter = state.filters.source, runFilter = state.filters.run;
  const qIndex = new Map(rows.map((r) => [r.src + "/" + Q(r)[1], r.q]));
  D.audit.forEach((audit, s) => {
    if (srcFilter && +srcFilter !== s) return;
    if (runFilter && +runFilter !== D.sources[s].run) return;
    for (const [id, a] of Object.entries(audit)) items.push([s, id, a, qIndex.get(s + "/" + id)]);
  });
  const needle = state.search.trim().toLowerCase();
  const shown = needle ? items.filter(([, id, , q]) => (id + "\n" + (q === undefined ? "" : D.questions[q][2])).toLowerCase().includes(needle)) : items;
  const box = el("div", { id: "queries" });
  const draw = () => {
    const start = state.page * state.pageSize;
    const head = ["source", "query", "Q(x,0)", "Q(x,1)", "π(c=1|x)", "s*(0|x)", "s*(1|x)", "rollouts c=0/1", "subsampled", "question"];
    put(box,
      el("div", { id: "query-count", "data-count": String(shown.length), text: `${shown.length} queries` }),
      pager(shown.length, draw),
      el("table", { class: "queries" }, el("tr", {}, head.map((h) => el("th", { text: h }))),
        shown.slice(start, start + state.pageSize).map(([s, id, a, q]) => el("tr", {
          class: "query", onclick: () => { state.question = q ?? null; state.filters.source = String(s); state.tab = "list"; render(); },
        }, el("td", { text: D.sources[s].name }), el("td", { text: id }), el("td", { text: num(a[0], 2) }), el("td", { text: num(a[1], 2) }),
        el("td", { text: num(a[2], 2) }), el("td", { text: num(a[3], 3) }), el("td", { text: num(a[4], 3) }),
        el("td", { text: `${a[5]} / ${a[6]}` }), el("td", { text: a[7] }),
        el("td", { class: "qtext", text: q === undefined ? "" : D.questions[q][2].slice(0, 100) })))));
  };
  draw();
  return box;
}

// --- side by side ---

function renderCompare() {
  const box = el("div", { id: "compare" });
  const order = [...new Set(visible.map((i) => rows[i].q))];
  if (state.compareQ === null && order.length) state.compareQ = order[0];
  if (state.compareQ === null) return el("p", { text: "No trajectory matches the filters." });
  const pos = order.indexOf(state.compareQ);
  const go = (d) => () => { state.compareQ = order[(pos + d + order.length) % order.length]; refresh(false); };
  const keep = ["run", "source", "mode"].filter((id) => state.filters[id]);
  const specs = SPECS.filter(([id]) => keep.includes(id));
  const cols = rows.filter((r) => r.q === state.compareQ && specs.every(([id, , , test]) => test(r, state.filters[id])));
  cols.sort((a, b) => a.src - b.src || S(a.mode).localeCompare(S(b.mode)) || a.sample - b.sample);
  const q = D.questions[state.compareQ];
  box.append(el("div", { class: "cmp-head" },
    el("button", { id: "cmp-prev", onclick: go(-1), disabled: order.length < 2 }, "‹ previous question"),
    el("span", { text: ` ${q[0]} · ${q[1]} (${pos < 0 ? "not in the filtered set" : `${pos + 1} of ${order.length} filtered questions`}) ` }),
    el("button", { id: "cmp-next", onclick: go(1), disabled: order.length < 2 }, "next question ›")),
  el("div", { class: "question" }, el("b", { text: "Question " }), q[2], el("b", { text: "  gold " }), q[3]),
  el("p", { class: "hint", text: "Columns: every trajectory of this question in the sources, runs and modes chosen above." }),
  el("div", { class: "columns" }, cols.map((r) => el("div", { class: "col", "data-source": D.sources[r.src].name },
    el("div", { class: "col-head" }, summaryLine(r).slice(0, 7)), detail(r)))));
  return box;
}

async function main() {
  const t0 = performance.now();
  try {
    D = await decode();
  } catch (e) {
    document.getElementById("app").textContent = "Could not read the embedded data: " + e.message;
    throw e;
  }
  const t1 = performance.now();
  rows = toRows(D);
  SPECS = filterSpecs();
  render();
  window.viewTiming = { decode_ms: t1 - t0, render_ms: performance.now() - t1 };
  document.body.dataset.ready = "1";
}

main();
