// ComfyUI-PiSA-SR front end (public extension API of ComfyUI frontend 1.x), for both node renderers: the classic
// canvas and "Vue nodes" (which draws each custom widget on a canvas of its own).
//  * Fidelity / perception pad on the sampler (any PiSA-SR node with FLOAT lambda_pix and lambda_sem): x = lambda_sem,
//    y = lambda_pix. Dragging sets both (snapped to 0.05, clamped to the widgets' min/max), typed edits move the dot,
//    and the release default (1, 1) is marked.
//  * Before / after slider on PiSA Tiled VAE Decode, over its `images` (result) and `pisa_lq` (resized LQ) previews.
// Each hook only warns on error; without this file the graph works unchanged (the decoder shows an ordinary preview).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PAD = "pisa_sr_pad";
const COMPARE = "pisa_sr_compare";
const PIX = "lambda_pix";
const SEM = "lambda_sem";
const DEFAULT = { pix: 1.0, sem: 1.0 }; // the release's default mode
const PAD_HEIGHT = 230;
const FAINT = "rgba(255,255,255,0.35)";
const SMALL = "10px sans-serif", TINY = "9px sans-serif";

const warn = (what, e) => console.warn(`[PiSA-SR] ${what}:`, e);
const color = (key, fallback) => globalThis.LiteGraph?.[key] ?? fallback;
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
const inside = (r, x, y, m = 0) => r && x >= r.x0 - m && x <= r.x1 + m && y >= r.y0 - m && y <= r.y1 + m;
const findWidget = (node, name) => node.widgets?.find((w) => w.name === name);

export function snapValue(v, lo, hi, step = 0.05) {
  return Number(clamp(Math.round(v / step) * step, lo, hi).toFixed(4));
}

function widgetRange(w) {
  const lo = Number.isFinite(w.options?.min) ? w.options.min : -2;
  const hi = Number.isFinite(w.options?.max) ? w.options.max : 4;
  return hi > lo ? [lo, hi] : [-2, 4];
}

function isLinked(node, name) {
  const input = node.inputs?.find((i) => i.name === name || i.widget?.name === name);
  return input?.link != null;
}

// Set a widget as an edit would: its setValue (front ends that have it), else value, callback and graph change.
function setWidget(node, w, value, e) {
  if (w.value === value) return;
  const canvas = app.canvas;
  try {
    if (typeof w.setValue === "function" && canvas) {
      w.setValue(value, { e, node, canvas });
      return;
    }
  } catch (err) {
    warn("setValue", err);
  }
  const old = w.value;
  w.value = value;
  w.callback?.(value, canvas, node, canvas?.graph_mouse, e);
  node.onWidgetChanged?.(w.name, value, old, w);
  if (node.graph) node.graph._version++;
}

// The classic canvas repaints on setDirtyCanvas; Vue nodes repaint a custom widget only through triggerDraw.
function redraw(node, w) {
  node.setDirtyCanvas?.(true, true);
  w.triggerDraw?.();
}

// A widget's own canvas (Vue nodes; the classic renderer draws on the graph canvas). Returns the width to draw at.
// Vue nodes before 1.33 let its pointer events bubble to the node, which then dragged the node away from under the
// pointer; the Vue nodes of 1.32.9 also lay their output preview over a tall widget's canvas, which then took the
// pointer: keep the events on the widget and its canvas on top. The Vue nodes of 1.53 size it from its zoomed width
// while pointer positions come in unzoomed CSS pixels: pin its height and scale back, so drawing and pointer agree.
function ownCanvas(ctx, width, height) {
  const el = ctx?.canvas;
  if (!el || el === app.canvas?.canvas) return width;
  if (!el.pisaOwnPointer) {
    el.pisaOwnPointer = true;
    if (getComputedStyle(el).position === "static") el.style.position = "relative";
    el.style.zIndex = "1";
    for (const t of ["pointerdown", "pointermove", "pointerup"]) el.addEventListener(t, (e) => e.stopPropagation());
  }
  if (!el.clientWidth) return width;
  const k = width / el.clientWidth;
  if (Math.abs(k - 1) > 0.01 && height > 0) {
    el.style.height = `${height + 2}px`;
    ctx.scale(k, 1);
  }
  return el.clientWidth;
}

function roundRect(ctx, x, y, w, h, r) {
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, h, r);
  else ctx.rect(x, y, w, h);
}

function label(ctx, text, x, y, align = "left", col = null, font = "11px sans-serif") {
  ctx.font = font;
  ctx.textAlign = align;
  ctx.textBaseline = "middle";
  ctx.fillStyle = col ?? color("WIDGET_SECONDARY_TEXT_COLOR", "#999");
  ctx.fillText(text, x, y);
}

// What both widgets share: not serialized; paint(ctx, width, y, lowQuality) draws in the coordinates pointer
// positions come in (and records the hit boxes); a press that press(pos, e) answers "drag" starts a drag
// ("handled": consumed) and dragTo(pos, e) applies it. The release position is ignored: Vue nodes report it relative
// to the node, not to the widget's canvas (which set lambda_pix to its minimum).
function customWidget(node, name, what) {
  return {
    name, type: name, value: null, options: { serialize: false }, serialize: false, y: 0, dragging: false,

    draw(ctx, _node, width, y, H, lowQuality) {
      try {
        ctx.save();
        this.paint(ctx, ownCanvas(ctx, width, H), y, lowQuality);
        ctx.restore();
      } catch (e) {
        warn(`${what} draw`, e);
      }
    },

    mouse(e, pos) {
      const type = e?.type ?? "";
      try {
        if (/down$/.test(type)) {
          const r = this.press(pos, e);
          if (r !== "drag") return r === "handled";
          this.dragging = true;
        } else if (/up$|cancel$/.test(type)) {
          if (!this.dragging) return false;
          this.dragging = false;
          redraw(node, this);
          return true;
        } else if (!this.dragging || !/move$/.test(type)) {
          return false;
        }
        this.dragTo(pos, e);
        return true;
      } catch (err) {
        warn(`${what} input`, err);
        this.dragging = false;
        return false;
      }
    },
  };
}

function grow(node, minWidth = 0) {
  const s = node.computeSize?.();
  if (s) node.setSize?.([Math.max(node.size[0], s[0], minWidth), Math.max(node.size[1], s[1])]);
}

// ------------------------------------------------------------------------------------------------ the pad
function makePad(node) {
  return {
    ...customWidget(node, PAD, "pad"), // paint() sets box (the pad) and resetBox (the "default" button)

    computeSize: (width) => [width ?? node.size[0], PAD_HEIGHT],

    axes() {
      const wp = findWidget(node, PIX), ws = findWidget(node, SEM);
      if (!wp || !ws) return null;
      const [pLo, pHi] = widgetRange(wp), [sLo, sHi] = widgetRange(ws);
      return { wp, ws, pLo, pHi, sLo, sHi, linked: isLinked(node, PIX) || isLinked(node, SEM) };
    },

    toXY(a, pix, sem) {
      const b = this.box;
      return [b.x0 + ((sem - a.sLo) / (a.sHi - a.sLo)) * (b.x1 - b.x0),
              b.y1 - ((pix - a.pLo) / (a.pHi - a.pLo)) * (b.y1 - b.y0)];
    },

    setLambdas(pix, sem, e) {
      const a = this.axes();
      if (!a || a.linked) return;
      setWidget(node, a.wp, snapValue(pix, a.pLo, a.pHi), e);
      setWidget(node, a.ws, snapValue(sem, a.sLo, a.sHi), e);
      redraw(node, this);
    },

    paint(ctx, width, y, lowQuality) {
      const a = this.axes();
      const x0 = 34, x1 = Math.max(x0 + 40, width - 14);
      const y0 = y + 24, y1 = y + PAD_HEIGHT - 26, xm = (x0 + x1) / 2, ym = (y0 + y1) / 2;
      this.box = { x0, x1, y0, y1 };
      const text = color("WIDGET_TEXT_COLOR", "#ddd");
      const dim = color("WIDGET_SECONDARY_TEXT_COLOR", "#999");
      const padPath = () => roundRect(ctx, x0, y0, x1 - x0, y1 - y0, 6);
      if (!lowQuality) { // header: title, readout, reset button
        label(ctx, "fidelity / perception", 14, y + 10, "left", dim);
        if (a) {
          const t = `pix ${Number(a.wp.value).toFixed(2)}  sem ${Number(a.ws.value).toFixed(2)}`;
          label(ctx, t, xm + 30, y + 10, "center", text, "bold 11px sans-serif");
        }
        const r = (this.resetBox = { x0: width - 62, x1: width - 14, y0: y + 2, y1: y + 18 });
        ctx.fillStyle = color("WIDGET_BGCOLOR", "#222");
        roundRect(ctx, r.x0, r.y0, 48, 16, 4);
        ctx.fill();
        label(ctx, "default", r.x0 + 24, y + 10, "center", dim, SMALL);
      }
      ctx.fillStyle = color("WIDGET_BGCOLOR", "#222");
      ctx.strokeStyle = color("WIDGET_OUTLINE_COLOR", "#666");
      ctx.lineWidth = 1;
      padPath();
      ctx.fill();
      ctx.stroke();
      if (!a) return label(ctx, "lambda_pix / lambda_sem widgets not found", xm, ym, "center", dim);
      // quadrant tint: more detail to the right, more cleanup upwards
      const g = ctx.createLinearGradient(x0, y1, x1, y0);
      g.addColorStop(0, "rgba(80,140,255,0.10)");
      g.addColorStop(1, "rgba(255,150,60,0.14)");
      ctx.fillStyle = g;
      padPath();
      ctx.fill();
      // grid on whole numbers, the zero lines brighter
      ctx.save();
      padPath();
      ctx.clip();
      const line = (v, ax, ay, bx, by) => {
        ctx.strokeStyle = v === 0 ? FAINT : "rgba(255,255,255,0.08)";
        ctx.beginPath(); ctx.moveTo(ax, ay); ctx.lineTo(bx, by); ctx.stroke();
      };
      for (let s = Math.ceil(a.sLo); s <= a.sHi; s++) {
        const [gx] = this.toXY(a, a.pLo, s);
        line(s, gx, y0, gx, y1);
        if (!lowQuality) label(ctx, String(s), gx + 2, y1 - 7, "left", FAINT, TINY);
      }
      for (let p = Math.ceil(a.pLo); p <= a.pHi; p++) {
        const [, gy] = this.toXY(a, p, a.sLo);
        line(p, x0, gy, x1, gy);
        if (!lowQuality && p > Math.ceil(a.pLo)) label(ctx, String(p), x1 - 3, gy - 6, "right", FAINT, TINY);
      }
      if (!lowQuality) {
        label(ctx, "\u2191 clean harder", x0 + 5, y0 + 9, "left", dim, SMALL);
        label(ctx, "\u2193 keep input", x0 + 5, y1 - 20, "left", dim, SMALL);
      }
      ctx.restore();
      // release default (1, 1)
      const [dx, dy] = this.toXY(a, DEFAULT.pix, DEFAULT.sem);
      ctx.setLineDash([3, 3]);
      ctx.strokeStyle = "rgba(255,255,255,0.7)";
      ctx.beginPath(); ctx.arc(dx, dy, 8, 0, Math.PI * 2); ctx.stroke();
      ctx.setLineDash([]);
      if (!lowQuality) label(ctx, "release default", dx + 11, dy - 9, "left", "rgba(255,255,255,0.75)", TINY);
      // the current setting
      const pix = Number(a.wp.value), sem = Number(a.ws.value);
      if (Number.isFinite(pix) && Number.isFinite(sem)) {
        const [cx, cy] = this.toXY(a, clamp(pix, a.pLo, a.pHi), clamp(sem, a.sLo, a.sHi));
        ctx.strokeStyle = "rgba(255,200,80,0.35)";
        ctx.beginPath(); ctx.moveTo(cx, y0); ctx.lineTo(cx, y1); ctx.moveTo(x0, cy); ctx.lineTo(x1, cy); ctx.stroke();
        ctx.fillStyle = a.linked ? "#777" : "#ffb347";
        ctx.strokeStyle = "#111";
        ctx.lineWidth = 2;
        ctx.beginPath(); ctx.arc(cx, cy, this.dragging ? 7 : 6, 0, Math.PI * 2); ctx.fill(); ctx.stroke();
      }
      if (a.linked) {
        ctx.fillStyle = "rgba(0,0,0,0.45)";
        padPath();
        ctx.fill();
        label(ctx, "lambdas are set by a link", xm, ym, "center", text);
      }
      if (!lowQuality) { // axis labels
        label(ctx, "\u2190 faithful", x0, y1 + 12, "left", dim, SMALL);
        label(ctx, "\u03bb_sem: semantic detail", xm, y1 + 12, "center", text, SMALL);
        label(ctx, "more detail \u2192", x1, y1 + 12, "right", dim, SMALL);
        ctx.translate(20, ym);
        ctx.rotate(-Math.PI / 2);
        label(ctx, "\u03bb_pix: pixel cleanup", 0, 0, "center", text, SMALL);
      }
    },

    press([x, y], e) {
      if (inside(this.resetBox, x, y)) {
        this.setLambdas(DEFAULT.pix, DEFAULT.sem, e);
        return "handled";
      }
      if (!inside(this.box, x, y, 4)) return false;
      const a = this.axes();
      return a && !a.linked ? "drag" : false;
    },

    dragTo([x, y], e) {
      const a = this.axes(), b = this.box;
      this.setLambdas(a.pLo + ((b.y1 - y) / (b.y1 - b.y0)) * (a.pHi - a.pLo),
                      a.sLo + ((x - b.x0) / (b.x1 - b.x0)) * (a.sHi - a.sLo), e);
    },
  };
}

// ------------------------------------------------------------------------------------------------ before / after
function loadView(img) {
  const q = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder ?? "", type: img.type ?? "temp" });
  const url = api.apiURL(`/view?${q}${app.getRandParam ? app.getRandParam() : ""}`);
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => reject(new Error(`could not load ${url}`));
    im.src = url;
  });
}

function makeCompare(node) {
  return {
    ...customWidget(node, COMPARE, "compare"), // paint() sets rect (the image, {x, y, w, h}) and navBox
    split: 0.5, // fraction of the image width showing the "before" (resized LQ)
    index: 0,
    after: [], // result previews (Image)
    before: [], // resized LQ previews (Image)
    // also: outputs (the node output these came from), ready, failed

    async load(output) {
      this.outputs = output; // the previous pair stays on screen until the new one has loaded
      this.failed = false;
      const tag = (this.loadTag = {});
      try {
        const [after, before] = await Promise.all(
          [output.images, output.pisa_lq].map((list) => Promise.all(list.map(loadView))));
        if (tag !== this.loadTag) return;
        this.after = after;
        this.before = before;
        this.index = Math.min(this.index, after.length - 1);
        this.ready = after.length > 0 && before.length > 0;
        if (this.ready) node.imgs = after; // keeps the node's "Open Image" / "Save Image" menu entries working
      } catch (e) {
        if (tag !== this.loadTag) return;
        warn("before/after images", e);
        this.ready = false;
        this.failed = true;
        node.hideOutputImages = false; // the front end's ordinary preview takes over
      }
      redraw(node, this);
    },

    imageHeight(width) {
      const im = this.after[this.index];
      const aspect = im && im.naturalWidth ? im.naturalHeight / im.naturalWidth : 1;
      return Math.round(clamp(Math.max(40, (width ?? node.size[0]) - 20) * aspect, 80, 640));
    },

    computeSize(width) { return [width ?? node.size[0], this.imageHeight(width) + 24]; },

    paint(ctx, width, y, lowQuality) {
      const availH = this.imageHeight(width);
      if (!this.ready) {
        return label(ctx, this.failed ? "before/after preview unavailable" : "loading before/after preview\u2026",
                     width / 2, y + availH / 2, "center");
      }
      const before = this.before[Math.min(this.index, this.before.length - 1)];
      const after = this.after[this.index];
      const ar = after.naturalHeight / after.naturalWidth;
      let w = Math.max(40, width - 20), h = w * ar;
      if (h > availH) { h = availH; w = h / ar; }
      const x = (width - w) / 2, top = y + 2, my = top + h / 2;
      this.rect = { x, y: top, w, h };
      const sx = x + this.split * w;
      // after (result) everywhere, before (resized LQ) left of the split
      ctx.drawImage(after, x, top, w, h);
      ctx.save();
      ctx.beginPath();
      ctx.rect(x, top, sx - x, h);
      ctx.clip();
      ctx.drawImage(before, x, top, w, h);
      ctx.restore();
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = 2;
      ctx.beginPath(); ctx.moveTo(sx, top); ctx.lineTo(sx, top + h); ctx.stroke();
      ctx.fillStyle = "#fff";
      ctx.strokeStyle = "#111";
      ctx.lineWidth = 1.5;
      ctx.beginPath(); ctx.arc(sx, my, 9, 0, Math.PI * 2); ctx.fill(); ctx.stroke();
      ctx.fillStyle = "#111";
      ctx.beginPath();
      for (const d of [-2, 2]) { ctx.moveTo(sx + d, my - 4); ctx.lineTo(sx + 3 * d, my); ctx.lineTo(sx + d, my + 4); }
      ctx.fill();
      if (lowQuality) return;
      const tag = (text, tx, align) => {
        ctx.font = SMALL;
        const tw = ctx.measureText(text).width + 8;
        const bx = align === "left" ? tx : tx - tw;
        ctx.fillStyle = "rgba(0,0,0,0.6)";
        roundRect(ctx, bx, top + 4, tw, 15, 3);
        ctx.fill();
        label(ctx, text, bx + 4, top + 11.5, "left", "#fff", SMALL);
      };
      if (this.split > 0.02) tag("before: input (resized)", x + 4, "left");
      if (this.split < 0.98) tag("after: PiSA-SR", x + w - 4, "right");
      const n = this.after.length, ty = top + h + 11;
      const cap = `${after.naturalWidth}\u00d7${after.naturalHeight} preview \u00b7 drag to compare`;
      label(ctx, cap, width / 2, ty, "center", null, SMALL);
      this.navBox = n > 1 ? { x0: x + w - 60, x1: x + w, y0: top + h + 2, y1: top + h + 22 } : null;
      const nav = `\u25c0 ${this.index + 1}/${n} \u25b6`;
      if (n > 1) label(ctx, nav, x + w, ty, "right", color("WIDGET_TEXT_COLOR", "#ddd"));
    },

    press([x, y]) {
      const r = this.rect, nb = this.navBox;
      if (!this.ready || !r) return false;
      if (inside(nb, x, y)) {
        const n = this.after.length;
        this.index = (this.index + (x < (nb.x0 + nb.x1) / 2 ? n - 1 : 1)) % n;
        node.imageIndex = this.index;
        redraw(node, this);
        return "handled";
      }
      return x >= r.x && x <= r.x + r.w && y >= r.y && y <= r.y + r.h ? "drag" : false;
    },

    dragTo([x]) {
      this.split = clamp((x - this.rect.x) / this.rect.w, 0, 1);
      redraw(node, this);
    },
  };
}

const hasComparison = (output) => [output?.images, output?.pisa_lq].every((l) => Array.isArray(l) && l.length > 0);

function showComparison(node, output) {
  let w = findWidget(node, COMPARE);
  if (!w) {
    w = node.addCustomWidget(makeCompare(node));
    grow(node); // give the preview room
  }
  if (w.outputs !== output) w.load(output);
  return w;
}

// Chain fn after obj[key]; an error in fn only warns.
function chain(obj, key, what, fn) {
  const orig = obj[key];
  obj[key] = function (...args) {
    const r = orig?.apply(this, args);
    try {
      fn.apply(this, args);
    } catch (e) {
      warn(what, e);
    }
    return r;
  };
}

function setupCompare(node) {
  // The slider is the decoder's preview: Vue nodes must not add their own. Set before the first run, as that renderer
  // decides when the output arrives (older front ends ignore the flag).
  node.hideOutputImages = true;
  chain(node, "onExecuted", "onExecuted", function (output) {
    if (hasComparison(output)) showComparison(this, output);
  });
  const origDrawBg = node.onDrawBackground;
  node.onDrawBackground = function () {
    try {
      // outputs restored from the front end's store (e.g. after switching workflow tabs)
      let w = findWidget(this, COMPARE);
      const out = w ? null : app.nodeOutputs?.[String(this.id)];
      if (hasComparison(out)) w = showComparison(this, out);
      if (w && !w.failed) {
        const i = this.widgets.findIndex((p) => p.name === "$$canvas-image-preview");
        if (i >= 0) {
          this.widgets[i].onRemove?.();
          this.widgets.splice(i, 1);
        }
        return;
      }
    } catch (e) {
      warn("preview", e);
    }
    return origDrawBg?.apply(this, arguments);
  };
}

// ------------------------------------------------------------------------------------------------ registration
const padTypes = new Set();

try {
  app.registerExtension({
    name: "comfyui-pisa-sr.ui",
    beforeRegisterNodeDef(nodeType, nodeData) {
      try {
        const ins = { ...nodeData?.input?.required, ...nodeData?.input?.optional };
        if (nodeData?.category?.startsWith("image/upscaling/PiSA-SR") && ins[PIX]?.[0] === "FLOAT" &&
            ins[SEM]?.[0] === "FLOAT") padTypes.add(nodeData.name);
      } catch (e) {
        warn("beforeRegisterNodeDef", e);
      }
    },
    nodeCreated(node) {
      try {
        const type = node.comfyClass ?? node.type;
        if (padTypes.has(type) && !findWidget(node, PAD)) {
          node.addCustomWidget(makePad(node));
          // typed edits redraw the pad (Vue nodes repaint a custom widget only when asked)
          for (const name of [PIX, SEM]) {
            const w = findWidget(node, name);
            if (w) chain(w, "callback", "widget edit", () => findWidget(node, PAD)?.triggerDraw?.());
          }
          grow(node, 300);
        }
        if (type === "PiSA_Decode") setupCompare(node);
      } catch (e) {
        warn("nodeCreated", e);
      }
    },
  });
} catch (e) {
  warn("registerExtension", e);
}
