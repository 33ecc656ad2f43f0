// ComfyUI-PiSA-SR front-end extension (ComfyUI frontend 1.x, public extension API only), for both node renderers:
// the classic canvas and "Vue nodes" (which draws each custom widget on a canvas of its own).
//
//  * Fidelity / perception pad on Dual-Guided One-Step Sample (any node with lambda_pix and lambda_sem number
//    widgets): x = lambda_sem (semantic detail), y = lambda_pix (pixel-level cleanup). Dragging sets both widgets,
//    editing the widgets moves the dot, values clamp to the widgets' min/max and snap to 0.05, and the release
//    default (1, 1) is marked.
//  * Before / after slider on PiSA Tiled VAE Decode: its execute() returns the result previews as `images` and the
//    resized LQ previews as `pisa_lq`; this draws them on top of each other with a draggable split.
//
// Everything is optional: each hook is wrapped so that an error only logs a warning, and without this file the
// graph works unchanged (the decode node then shows the result as an ordinary preview).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXT = "comfyui-pisa-sr.ui";
const PAD = "pisa_sr_pad";
const COMPARE = "pisa_sr_compare";
const LQ_KEY = "pisa_lq";
const PIX = "lambda_pix";
const SEM = "lambda_sem";
const SNAP = 0.05;
const DEFAULT = { pix: 1.0, sem: 1.0 }; // the release's default mode
const PAD_HEIGHT = 230;
const DEFAULT_PREVIEW_WIDGET = "$$canvas-image-preview"; // the front end's canvas image preview

const warn = (what, e) => console.warn(`[PiSA-SR] ${what}:`, e);
const LG = () => globalThis.LiteGraph ?? {};
const color = (key, fallback) => LG()[key] ?? fallback;
const isDown = (e) => /down$/.test(e?.type ?? "");
const isMove = (e) => /move$/.test(e?.type ?? "");
const isUp = (e) => /up$|cancel$/.test(e?.type ?? "");

export function snapValue(v, lo, hi, step = SNAP) {
  let s = Math.round(v / step) * step;
  s = Math.min(hi, Math.max(lo, s));
  return Number(s.toFixed(4));
}

function widgetRange(w, fallbackLo = -2, fallbackHi = 4) {
  const lo = Number.isFinite(w?.options?.min) ? w.options.min : fallbackLo;
  const hi = Number.isFinite(w?.options?.max) ? w.options.max : fallbackHi;
  return hi > lo ? [lo, hi] : [fallbackLo, fallbackHi];
}

function findWidget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function isLinked(node, name) {
  const input = node.inputs?.find((i) => i.name === name || i.widget?.name === name);
  return input != null && input.link != null;
}

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

// Redraw a widget in both renderers: the classic canvas repaints on setDirtyCanvas; the Vue-nodes renderer draws
// each custom widget on its own small canvas and repaints it only through widget.triggerDraw.
function redraw(node, w) {
  node.setDirtyCanvas?.(true, true);
  w?.triggerDraw?.();
}

// The Vue-nodes renderer draws each custom widget on a canvas of its own. Before 1.33 its pointer events bubbled to
// the node, which then dragged the node away from under the pointer after the first move: keep them on the widget.
function ownPointer(ctx) {
  const el = ctx?.canvas;
  if (!el || el === app.canvas?.canvas || el.pisaOwnPointer) return;
  el.pisaOwnPointer = true;
  // 1.32.9's Vue nodes lay their own output preview over the lower part of a tall custom widget's canvas, which then
  // took the pointer (the compare slider could not be dragged there): keep the widget's canvas on top.
  if (getComputedStyle(el).position === "static") el.style.position = "relative";
  el.style.zIndex = "1";
  for (const type of ["pointerdown", "pointermove", "pointerup"]) el.addEventListener(type, (e) => e.stopPropagation());
}

// Draw in the coordinates pointer positions come in. The Vue nodes of 1.53 size a custom widget's canvas from its
// zoomed on-screen width (so away from 100% zoom the drawing came out scaled and spilled out of the node) while
// pointer positions are in unzoomed CSS pixels: pin the canvas to the widget's height and scale back. Returns the
// width to draw at.
function cssWidth(ctx, width, height) {
  const el = ctx?.canvas;
  if (!el || el === app.canvas?.canvas || !el.clientWidth) return width;
  const k = width / el.clientWidth;
  if (Math.abs(k - 1) > 0.01 && height > 0) {
    el.style.height = `${height + 2}px`;
    ctx.scale(k, 1);
  }
  return el.clientWidth;
}

// The pointer protocol both widgets share: a press inside starts a drag, moves while dragging apply the pointer
// position. The release position is ignored: the Vue-nodes renderer reports it in graph coordinates (relative to the
// node) while press and moves come in the widget's own canvas coordinates, which set lambda_pix to its minimum.
// press(pos) returns "drag" (start dragging and apply pos), "handled" (consumed, no drag) or false.
function dragMouse(widget, node, what, e, pos, press, apply) {
  try {
    if (isDown(e)) {
      const r = press(pos);
      if (r !== "drag") return r === "handled";
      widget.dragging = true;
    } else if (isUp(e)) {
      if (!widget.dragging) return false;
      widget.dragging = false;
      redraw(node, widget);
      return true;
    } else if (!(isMove(e) && widget.dragging)) {
      return false;
    }
    apply(pos);
    return true;
  } catch (err) {
    warn(what, err);
    widget.dragging = false;
    return false;
  }
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

// ------------------------------------------------------------------------------------------------ the pad
function makePad(node) {
  const widget = {
    name: PAD,
    type: "pisa_sr_pad",
    value: null,
    options: { serialize: false },
    serialize: false,
    y: 0,
    dragging: false,
    box: null, // pad rectangle in the coordinates the renderer draws and reports pointer positions in
    resetBox: null,

    computeSize(width) {
      return [width ?? node.size[0], PAD_HEIGHT];
    },

    axes() {
      const wp = findWidget(node, PIX);
      const ws = findWidget(node, SEM);
      if (!wp || !ws) return null;
      const [pLo, pHi] = widgetRange(wp);
      const [sLo, sHi] = widgetRange(ws);
      return { wp, ws, pLo, pHi, sLo, sHi, linked: isLinked(node, PIX) || isLinked(node, SEM) };
    },

    // value <-> pad position (node coordinates)
    toXY(a, pix, sem) {
      const b = this.box;
      return [b.x0 + ((sem - a.sLo) / (a.sHi - a.sLo)) * (b.x1 - b.x0),
              b.y1 - ((pix - a.pLo) / (a.pHi - a.pLo)) * (b.y1 - b.y0)];
    },
    fromXY(a, x, y) {
      const b = this.box;
      const sem = a.sLo + ((x - b.x0) / (b.x1 - b.x0)) * (a.sHi - a.sLo);
      const pix = a.pLo + ((b.y1 - y) / (b.y1 - b.y0)) * (a.pHi - a.pLo);
      return { pix: snapValue(pix, a.pLo, a.pHi), sem: snapValue(sem, a.sLo, a.sHi) };
    },

    setLambdas(pix, sem, e) {
      const a = this.axes();
      if (!a || a.linked) return false;
      setWidget(node, a.wp, snapValue(pix, a.pLo, a.pHi), e);
      setWidget(node, a.ws, snapValue(sem, a.sLo, a.sHi), e);
      redraw(node, this);
      return true;
    },

    draw(ctx, _node, width, y, H, lowQuality) {
      try {
        ownPointer(ctx);
        ctx.save();
        this.drawPad(ctx, cssWidth(ctx, width, H), y, lowQuality);
        ctx.restore();
      } catch (e) {
        warn("pad draw", e);
      }
    },

    drawPad(ctx, width, y, lowQuality) {
      const a = this.axes();
      const x0 = 34, x1 = Math.max(x0 + 40, width - 14);
      const y0 = y + 24, y1 = y + PAD_HEIGHT - 26;
      this.box = { x0, x1, y0, y1 };
      ctx.save();
      const text = color("WIDGET_TEXT_COLOR", "#ddd");
      const dim = color("WIDGET_SECONDARY_TEXT_COLOR", "#999");
      // header: title + readout + reset
      if (!lowQuality) {
        label(ctx, "fidelity / perception", 14, y + 10, "left", dim);
        if (a) {
          const t = `pix ${Number(a.wp.value).toFixed(2)}  sem ${Number(a.ws.value).toFixed(2)}`;
          label(ctx, t, (x0 + x1) / 2 + 30, y + 10, "center", text, "bold 11px sans-serif");
        }
        const rw = 48;
        this.resetBox = { x0: width - 14 - rw, x1: width - 14, y0: y + 2, y1: y + 18 };
        ctx.fillStyle = color("WIDGET_BGCOLOR", "#222");
        roundRect(ctx, width - 14 - rw, y + 2, rw, 16, 4);
        ctx.fill();
        label(ctx, "default", width - 14 - rw / 2, y + 10, "center", dim, "10px sans-serif");
      }
      // pad background
      ctx.fillStyle = color("WIDGET_BGCOLOR", "#222");
      ctx.strokeStyle = color("WIDGET_OUTLINE_COLOR", "#666");
      ctx.lineWidth = 1;
      roundRect(ctx, x0, y0, x1 - x0, y1 - y0, 6);
      ctx.fill();
      ctx.stroke();
      if (!a) {
        label(ctx, "lambda_pix / lambda_sem widgets not found", (x0 + x1) / 2, (y0 + y1) / 2, "center", dim);
        ctx.restore();
        return;
      }
      // quadrant tint: more detail to the right, more cleanup upwards
      const g = ctx.createLinearGradient(x0, y1, x1, y0);
      g.addColorStop(0, "rgba(80,140,255,0.10)");
      g.addColorStop(1, "rgba(255,150,60,0.14)");
      ctx.fillStyle = g;
      roundRect(ctx, x0, y0, x1 - x0, y1 - y0, 6);
      ctx.fill();
      // grid on whole numbers; the zero lines brighter
      ctx.save();
      roundRect(ctx, x0, y0, x1 - x0, y1 - y0, 6);
      ctx.clip();
      for (let s = Math.ceil(a.sLo); s <= a.sHi; s++) {
        const [gx] = this.toXY(a, a.pLo, s);
        ctx.strokeStyle = s === 0 ? "rgba(255,255,255,0.35)" : "rgba(255,255,255,0.08)";
        ctx.beginPath(); ctx.moveTo(gx, y0); ctx.lineTo(gx, y1); ctx.stroke();
        if (!lowQuality) label(ctx, String(s), gx + 2, y1 - 7, "left", "rgba(255,255,255,0.35)", "9px sans-serif");
      }
      for (let p = Math.ceil(a.pLo); p <= a.pHi; p++) {
        const [, gy] = this.toXY(a, p, a.sLo);
        ctx.strokeStyle = p === 0 ? "rgba(255,255,255,0.35)" : "rgba(255,255,255,0.08)";
        ctx.beginPath(); ctx.moveTo(x0, gy); ctx.lineTo(x1, gy); ctx.stroke();
        if (!lowQuality && p !== Math.ceil(a.pLo)) {
          label(ctx, String(p), x1 - 3, gy - 6, "right", "rgba(255,255,255,0.35)", "9px sans-serif");
        }
      }
      if (!lowQuality) {
        label(ctx, "\u2191 clean harder", x0 + 5, y0 + 9, "left", dim, "10px sans-serif");
        label(ctx, "\u2193 keep input", x0 + 5, y1 - 20, "left", dim, "10px sans-serif");
      }
      ctx.restore();
      // release default (1, 1)
      const [dx, dy] = this.toXY(a, DEFAULT.pix, DEFAULT.sem);
      ctx.setLineDash([3, 3]);
      ctx.strokeStyle = "rgba(255,255,255,0.7)";
      ctx.beginPath(); ctx.arc(dx, dy, 8, 0, Math.PI * 2); ctx.stroke();
      ctx.setLineDash([]);
      if (!lowQuality) label(ctx, "release default", dx + 11, dy - 9, "left", "rgba(255,255,255,0.75)", "9px sans-serif");
      // the current setting
      const pix = Number(a.wp.value), sem = Number(a.ws.value);
      if (Number.isFinite(pix) && Number.isFinite(sem)) {
        const [cx, cy] = this.toXY(a, Math.min(a.pHi, Math.max(a.pLo, pix)), Math.min(a.sHi, Math.max(a.sLo, sem)));
        ctx.strokeStyle = "rgba(255,200,80,0.35)";
        ctx.beginPath(); ctx.moveTo(cx, y0); ctx.lineTo(cx, y1); ctx.moveTo(x0, cy); ctx.lineTo(x1, cy); ctx.stroke();
        ctx.fillStyle = a.linked ? "#777" : "#ffb347";
        ctx.strokeStyle = "#111";
        ctx.lineWidth = 2;
        ctx.beginPath(); ctx.arc(cx, cy, this.dragging ? 7 : 6, 0, Math.PI * 2); ctx.fill(); ctx.stroke();
      }
      if (a.linked) {
        ctx.fillStyle = "rgba(0,0,0,0.45)";
        roundRect(ctx, x0, y0, x1 - x0, y1 - y0, 6);
        ctx.fill();
        label(ctx, "lambdas are set by a link", (x0 + x1) / 2, (y0 + y1) / 2, "center", text);
      }
      if (!lowQuality) {
        // axis labels: x = semantic detail, y = pixel cleanup
        label(ctx, "\u2190 faithful", x0, y1 + 12, "left", dim, "10px sans-serif");
        label(ctx, "\u03bb_sem: semantic detail", (x0 + x1) / 2, y1 + 12, "center", text, "10px sans-serif");
        label(ctx, "more detail \u2192", x1, y1 + 12, "right", dim, "10px sans-serif");
        ctx.save();
        ctx.translate(20, (y0 + y1) / 2);
        ctx.rotate(-Math.PI / 2);
        label(ctx, "\u03bb_pix: pixel cleanup", 0, 0, "center", text, "10px sans-serif");
        ctx.restore();
      }
      ctx.restore();
    },

    mouse(e, pos, _node) {
      return dragMouse(this, node, "pad input", e, pos, ([x, y]) => {
        const b = this.box, r = this.resetBox;
        if (!b) return false;
        if (r && x >= r.x0 && x <= r.x1 && y >= r.y0 && y <= r.y1) {
          this.setLambdas(DEFAULT.pix, DEFAULT.sem, e);
          return "handled";
        }
        if (x < b.x0 - 4 || x > b.x1 + 4 || y < b.y0 - 4 || y > b.y1 + 4) return false;
        const a = this.axes();
        return a && !a.linked ? "drag" : false;
      }, ([x, y]) => {
        const a = this.axes();
        if (!a) return;
        const v = this.fromXY(a, x, y);
        this.setLambdas(v.pix, v.sem, e);
      });
    },
  };
  return widget;
}

// ------------------------------------------------------------------------------------------------ before / after
function viewUrl(img) {
  const params = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder ?? "", type: img.type ?? "temp" });
  return api.apiURL(`/view?${params}${app.getRandParam ? app.getRandParam() : ""}`);
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => reject(new Error(`could not load ${url}`));
    im.src = url;
  });
}

function makeCompare(node) {
  const widget = {
    name: COMPARE,
    type: "pisa_sr_compare",
    value: null,
    options: { serialize: false },
    serialize: false,
    y: 0,
    split: 0.5, // fraction of the image width showing the "before" (resized LQ)
    index: 0,
    after: [], // result previews (Image)
    before: [], // resized LQ previews (Image)
    outputs: null, // the node output these were loaded from
    ready: false,
    failed: false,
    dragging: false,
    rect: null, // image rectangle in node coordinates (set by draw)
    navBox: null,

    async load(output) {
      this.outputs = output; // the previous pair stays on screen until the new one has loaded
      this.failed = false;
      const tag = (this.loadTag = {});
      try {
        const [after, before] = await Promise.all([
          Promise.all(output.images.map((i) => loadImage(viewUrl(i)))),
          Promise.all(output[LQ_KEY].map((i) => loadImage(viewUrl(i)))),
        ]);
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
        this.failed = true; // the front end's ordinary preview takes over
      }
      if (this.failed) node.hideOutputImages = false; // the front end's ordinary preview takes over
      redraw(node, this);
    },

    aspect() {
      const im = this.after[this.index];
      return im && im.naturalWidth ? im.naturalHeight / im.naturalWidth : 1;
    },

    imageHeight(width) {
      const w = Math.max(40, (width ?? node.size[0]) - 20);
      return Math.round(Math.min(640, Math.max(80, w * this.aspect())));
    },

    computeSize(width) {
      return [width ?? node.size[0], this.imageHeight(width) + 24];
    },

    draw(ctx, _node, width, y, H, lowQuality) {
      try {
        ownPointer(ctx);
        ctx.save();
        this.drawCompare(ctx, cssWidth(ctx, width, H), y, lowQuality);
        ctx.restore();
      } catch (e) {
        warn("compare draw", e);
      }
    },

    drawCompare(ctx, width, y, lowQuality) {
      const availW = Math.max(40, width - 20);
      const availH = this.imageHeight(width);
      ctx.save();
      if (!this.ready) {
        label(ctx, this.failed ? "before/after preview unavailable" : "loading before/after preview\u2026",
              width / 2, y + availH / 2, "center");
        ctx.restore();
        return;
      }
      const before = this.before[Math.min(this.index, this.before.length - 1)];
      const after = this.after[this.index];
      const ar = after.naturalHeight / after.naturalWidth;
      let w = availW, h = w * ar;
      if (h > availH) { h = availH; w = h / ar; }
      const x = (width - w) / 2, top = y + 2;
      this.rect = { x, y: top, w, h };
      const sx = x + this.split * w;
      // after (result) everywhere, before (resized LQ) on the left of the split
      ctx.drawImage(after, x, top, w, h);
      ctx.save();
      ctx.beginPath();
      ctx.rect(x, top, sx - x, h);
      ctx.clip();
      ctx.drawImage(before, x, top, w, h);
      ctx.restore();
      // split line and handle
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = 2;
      ctx.beginPath(); ctx.moveTo(sx, top); ctx.lineTo(sx, top + h); ctx.stroke();
      ctx.fillStyle = "#fff";
      ctx.strokeStyle = "#111";
      ctx.lineWidth = 1.5;
      ctx.beginPath(); ctx.arc(sx, top + h / 2, 9, 0, Math.PI * 2); ctx.fill(); ctx.stroke();
      ctx.fillStyle = "#111";
      ctx.beginPath();
      ctx.moveTo(sx - 2, top + h / 2 - 4); ctx.lineTo(sx - 6, top + h / 2); ctx.lineTo(sx - 2, top + h / 2 + 4);
      ctx.moveTo(sx + 2, top + h / 2 - 4); ctx.lineTo(sx + 6, top + h / 2); ctx.lineTo(sx + 2, top + h / 2 + 4);
      ctx.fill();
      if (!lowQuality) {
        const tag = (text, tx, align) => {
          ctx.font = "10px sans-serif";
          const tw = ctx.measureText(text).width + 8;
          const bx = align === "left" ? tx : tx - tw;
          ctx.fillStyle = "rgba(0,0,0,0.6)";
          roundRect(ctx, bx, top + 4, tw, 15, 3);
          ctx.fill();
          label(ctx, text, bx + 4, top + 11.5, "left", "#fff", "10px sans-serif");
        };
        if (this.split > 0.02) tag("before: input (resized)", x + 4, "left");
        if (this.split < 0.98) tag("after: PiSA-SR", x + w - 4, "right");
        const n = this.after.length;
        const cap = `${after.naturalWidth}\u00d7${after.naturalHeight} preview \u00b7 drag to compare`;
        label(ctx, cap, width / 2, top + h + 11, "center", null, "10px sans-serif");
        this.navBox = null;
        if (n > 1) {
          const t = `\u25c0 ${this.index + 1}/${n} \u25b6`;
          label(ctx, t, x + w, top + h + 11, "right", color("WIDGET_TEXT_COLOR", "#ddd"), "11px sans-serif");
          this.navBox = { x0: x + w - 60, x1: x + w, y0: top + h + 2, y1: top + h + 22 };
        }
      }
      ctx.restore();
    },

    mouse(e, pos, _node) {
      return dragMouse(this, node, "compare input", e, pos, ([x, y]) => {
        const r = this.rect, nb = this.navBox;
        if (!this.ready || !r) return false;
        if (nb && x >= nb.x0 && x <= nb.x1 && y >= nb.y0 && y <= nb.y1) {
          const n = this.after.length;
          this.index = (this.index + (x < (nb.x0 + nb.x1) / 2 ? n - 1 : 1)) % n;
          node.imageIndex = this.index;
          redraw(node, this);
          return "handled";
        }
        return x >= r.x && x <= r.x + r.w && y >= r.y && y <= r.y + r.h ? "drag" : false;
      }, ([x]) => {
        const r = this.rect;
        this.split = Math.min(1, Math.max(0, (x - r.x) / r.w));
        redraw(node, this);
      });
    },
  };
  return widget;
}

function hasComparison(output) {
  return Array.isArray(output?.images) && output.images.length > 0 &&
    Array.isArray(output?.[LQ_KEY]) && output[LQ_KEY].length > 0;
}

function compareWidget(node, create = false) {
  let w = findWidget(node, COMPARE);
  if (!w && create) {
    w = node.addCustomWidget(makeCompare(node));
    // give the preview room: grow the node to fit the new widget
    const size = node.computeSize?.();
    if (size) node.setSize?.([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  }
  return w;
}

function removeDefaultPreview(node) {
  const i = node.widgets?.findIndex((w) => w.name === DEFAULT_PREVIEW_WIDGET) ?? -1;
  if (i >= 0) {
    node.widgets[i].onRemove?.();
    node.widgets.splice(i, 1);
  }
}

function showComparison(node, output) {
  const w = compareWidget(node, true);
  if (w.outputs !== output) w.load(output);
  return w;
}

function setupCompare(node) {
  // The compare widget is the decoder's preview: the Vue-nodes renderer must not add its own image preview. Set
  // before the first run, as that renderer decides when the output arrives (older front ends ignore the flag).
  node.hideOutputImages = true;
  const origExecuted = node.onExecuted;
  node.onExecuted = function (output) {
    const r = origExecuted?.apply(this, arguments);
    try {
      if (hasComparison(output)) showComparison(this, output);
    } catch (e) {
      warn("onExecuted", e);
    }
    return r;
  };
  const origDrawBg = node.onDrawBackground;
  node.onDrawBackground = function () {
    let w = null;
    try {
      w = findWidget(this, COMPARE);
      if (!w) {
        // outputs restored from the front end's store (e.g. after switching workflow tabs)
        const out = app.nodeOutputs?.[String(this.id)];
        if (hasComparison(out)) w = showComparison(this, out);
      }
      if (w && !w.failed) {
        removeDefaultPreview(this);
        return;
      }
    } catch (e) {
      warn("preview", e);
    }
    return origDrawBg?.apply(this, arguments);
  };
}

// ------------------------------------------------------------------------------------------------ registration
// The pad redraws when a number is typed into lambda_pix or lambda_sem (the Vue-nodes renderer repaints a custom
// widget only when asked).
function followEdits(node) {
  for (const name of [PIX, SEM]) {
    const w = findWidget(node, name);
    if (!w) continue;
    const orig = w.callback;
    w.callback = function () {
      const r = orig?.apply(this, arguments);
      findWidget(node, PAD)?.triggerDraw?.();
      return r;
    };
  }
}

function hasLambdaInputs(nodeData) {
  const req = { ...(nodeData?.input?.required ?? {}), ...(nodeData?.input?.optional ?? {}) };
  return req[PIX]?.[0] === "FLOAT" && req[SEM]?.[0] === "FLOAT";
}

const padTypes = new Set();
const compareTypes = new Set(["PiSA_Decode"]);

try {
  app.registerExtension({
    name: EXT,
    beforeRegisterNodeDef(nodeType, nodeData) {
      try {
        if (nodeData?.category?.startsWith("image/upscaling/PiSA-SR") && hasLambdaInputs(nodeData)) {
          padTypes.add(nodeData.name);
        }
      } catch (e) {
        warn("beforeRegisterNodeDef", e);
      }
    },
    nodeCreated(node) {
      try {
        const type = node.comfyClass ?? node.type;
        if (padTypes.has(type) && !findWidget(node, PAD)) {
          node.addCustomWidget(makePad(node));
          followEdits(node);
          const size = node.computeSize?.();
          if (size) node.setSize?.([Math.max(node.size[0], size[0], 300), Math.max(node.size[1], size[1])]);
        }
        if (compareTypes.has(type)) setupCompare(node);
      } catch (e) {
        warn("nodeCreated", e);
      }
    },
  });
} catch (e) {
  warn("registerExtension", e);
}
