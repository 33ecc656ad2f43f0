// Live lambda preview (issue 21): after a run, a lambda edit on the sampler (pad drag or typed value) asks the pack's
// route for a small preview prompt (the run's cached upstream nodes + PiSA_LivePreview), queues it at the front, and
// draws the picture the `pisa_sr.live` event brings on the decoder it names (compare.js), for every decoder holding
// the run's token. Models run only in ComfyUI's executor that way. Per token: one request in flight, the latest
// setting of each view of each decoder pending, an answer older than the one drawn dropped. The user's Queue or an
// interrupt cancels what is still pending.
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { chain, findWidget, warn } from "./widget.js";

const EVENT = "pisa_sr.live", ROUTE = "/pisa_sr/live/prompt", COMPARE = "pisa_sr_compare";
export const FIT_SIZE = 1024; // max side of a fit preview: the decoder's own preview size (nodes/preview.py)

// token -> { seq, busy: request | null, pending: Map "view:decoder" -> request, drawn: { "view:decoder": seq }, floor }
const runs = new Map();
const ours = new Set(); // ids of preview prompts queued and not finished
const finished = new Set(); // ids of preview prompts that finished before /prompt answered (rare; bounded below)

const decoders = (token) => app.graph.nodes.filter((n) => n.pisaLive === token);
const liveWidget = (node) => findWidget(node, COMPARE);

function run(token) {
  if (!runs.has(token)) {
    while (runs.size >= 8) runs.delete(runs.keys().next().value); // the backend keeps a few entries too
    runs.set(token, { seq: 0, busy: null, pending: new Map(), drawn: {}, floor: 0 });
  }
  return runs.get(token);
}

// Tell the decoder `decoder` (null: every one) of the token: compare.js's widget draws it (its liveUpdate()).
function show(token, what, decoder = null) {
  for (const node of decoders(token).filter((n) => decoder == null || String(n.id) === decoder)) {
    liveWidget(node)?.liveUpdate(what).catch((e) => warn("live preview image", e));
  }
}

async function postJSON(path, body) {
  const r = await api.fetchApi(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                       body: JSON.stringify(body) });
  const text = await r.text();
  let data = {};
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    data = { error: text.slice(0, 200) };
  }
  return { ok: r.ok, status: r.status, data };
}

// A /prompt refusal as one line: its message and the first node error.
function promptError(data) {
  const node = Object.values(data.node_errors ?? {})[0]?.errors?.[0];
  return [data.error?.message ?? data.error, node && `${node.message}: ${node.details}`].filter(Boolean).join(": ");
}

async function send(token, st) {
  const key = [...st.pending.keys()].find((k) => k.startsWith("loupe")) ?? st.pending.keys().next().value;
  const req = (st.busy = st.pending.get(key)); // a held loupe first
  st.pending.delete(key);
  const asked = await postJSON(ROUTE, { token, ...req });
  if (st.busy !== req) return; // cancelled meanwhile
  if (!asked.ok) return done(token, req, asked.data.error ?? `live preview refused (HTTP ${asked.status})`);
  const queued = await postJSON("/prompt", { prompt: asked.data.prompt, client_id: api.clientId ?? api.initialClientId,
                                             front: true });
  if (!queued.ok) return done(token, req, promptError(queued.data) || `preview prompt refused (HTTP ${queued.status})`);
  req.promptId = queued.data.prompt_id;
  if (st.busy !== req) return postJSON("/queue", { delete: [req.promptId] }); // cancelled while it was being queued
  if (finished.delete(req.promptId)) return done(token, req); // it ran before /prompt answered
  ours.add(req.promptId);
}

// The request `req` of `token` ended (answer, error or its prompt finished): start the next pending one.
function done(token, req, error) {
  const st = runs.get(token);
  if (req.promptId) ours.delete(req.promptId);
  if (error && req.seq >= st.floor) show(token, { error, seq: req.seq }, req.decoder);
  if (st.busy !== req) return;
  st.busy = null;
  if (st.pending.size) send(token, st).catch((e) => fail(token, st, e));
}

function fail(token, st, e) {
  warn("live preview", e);
  if (st.busy) done(token, st.busy, `live preview failed: ${e.message ?? e}`);
}

// Ask for a preview of `token` for decoder node `at.decoder` at the given lambdas: view "fit" (the whole frame) or
// "loupe" (an at.size crop around output pixel at.x, at.y). Coalesced: while one is in flight only the latest of
// each view and decoder waits.
export function requestPreview(token, lambdas, view, at) {
  const st = run(token);
  const req = { seq: ++st.seq, view, decoder: String(at.decoder), lambda_pix: lambdas.pix, lambda_sem: lambdas.sem,
                frame: at.frame ?? 0, size: view === "fit" ? FIT_SIZE : at.size,
                ...(view === "loupe" ? { x: at.x, y: at.y } : {}) };
  st.pending.set(`${view}:${req.decoder}`, req);
  if (!st.busy) send(token, st).catch((e) => fail(token, st, e));
  return req.seq;
}

// The lambdas a preview of `token` uses: the sampler that made it (its current widget values).
export function samplerLambdas(token) {
  const s = app.graph.nodes.find((n) => n.pisaLiveRun?.token === token);
  const v = (k) => Number(findWidget(s, k)?.value);
  return s && { pix: v("lambda_pix"), sem: v("lambda_sem") };
}

function onLive({ detail: d }) {
  const st = d && runs.get(d.token);
  if (!st || d.seq < st.floor) return; // not ours, or cancelled
  const req = st.busy?.seq === d.seq ? st.busy : null;
  const decoder = d.decoder ?? req?.decoder ?? null, key = `${d.view}:${decoder}`;
  if (d.status) return show(d.token, { status: d.status, seq: d.seq }, decoder);
  if (d.image && d.seq > (st.drawn[key] ?? 0)) {
    st.drawn[key] = d.seq; // an older answer (lower seq) is never drawn over it
    show(d.token, { preview: d }, decoder);
  }
  if (req && (d.image || d.error)) done(d.token, req, d.error);
  else if (d.error) show(d.token, { error: d.error, seq: d.seq }, decoder);
}

// A preview prompt ended without its event (e.g. the executor refused it): free its slot.
function onPromptEnd({ detail }) {
  const id = detail?.prompt_id;
  if (!id) return;
  for (const [token, st] of runs) {
    if (st.busy?.promptId === id) return done(token, st.busy);
  }
  if (!ours.has(id)) {
    finished.add(id);
    if (finished.size > 32) finished.delete(finished.values().next().value);
  }
}

// The user's Queue or an interrupt: drop the waiting settings, delete the preview prompts still queued, answers
// from before are not drawn, the decoders lose the preview label.
function cancelAll() {
  const ids = [...ours];
  ours.clear();
  for (const [token, st] of runs) {
    st.pending.clear();
    st.busy = null;
    st.floor = st.seq + 1;
    show(token, { clear: true });
  }
  if (ids.length) postJSON("/queue", { delete: ids }).catch((e) => warn("live preview cancel", e));
}

let listening = false;
function listen() {
  if (listening) return;
  listening = true;
  api.addEventListener(EVENT, onLive);
  api.addEventListener("promptQueued", cancelAll);
  api.addEventListener("execution_interrupted", cancelAll);
  for (const t of ["execution_success", "execution_error"]) api.addEventListener(t, onPromptEnd);
}

// The sampler: keeps its run's live entry ({token, lambda_pix, lambda_sem, default_mode}) and asks for a fit preview
// on each decoder of that run when a lambda changes.
export function watchSampler(node) {
  listen();
  chain(node, "onExecuted", "live onExecuted", function (output) {
    if (output?.pisa_live?.[0]?.token) this.pisaLiveRun = output.pisa_live[0];
  });
  const ask = () => { // once both lambdas of a pad move are set
    node.pisaLiveAsked = false;
    const token = node.pisaLiveRun?.token;
    for (const d of token ? decoders(token) : []) {
      requestPreview(token, samplerLambdas(token), "fit", { decoder: d.id, frame: liveWidget(d)?.index });
    }
  };
  for (const name of ["lambda_pix", "lambda_sem"]) {
    chain(findWidget(node, name) ?? {}, "callback", "live preview", () => {
      if (!node.pisaLiveAsked) queueMicrotask(ask);
      node.pisaLiveAsked = true;
    });
  }
}

// The decoder: keeps the token its output carries (compare.js calls this with each output it shows).
export function decoderOutput(node, output) {
  listen();
  node.pisaLive = output?.pisa_live?.[0] ?? null;
}
