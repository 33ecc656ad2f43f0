// The widget base the pad (pad.js) and the before/after slider (compare.js) share: a LiteGraph custom widget
// (node.addCustomWidget: draw, mouse, computeSize) for both node renderers, the classic canvas and "Vue nodes" (which
// draws each custom widget on a canvas of its own). ComfyUI imports every .js under web/ as an extension: the modules
// only export, pisa_sr.js alone registers.
import { app } from "../../scripts/app.js";

export const warn = (what, e) => console.warn(`[PiSA-SR] ${what}:`, e);
export const color = (key, fallback) => globalThis.LiteGraph?.[key] ?? fallback;
export const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
export const inside = (r, x, y, m = 0) => r && x >= r.x0 - m && x <= r.x1 + m && y >= r.y0 - m && y <= r.y1 + m;
export const findWidget = (node, name) => node.widgets?.find((w) => w.name === name);
export const SMALL = "10px sans-serif", TINY = "9px sans-serif";

// The classic canvas repaints on setDirtyCanvas; Vue nodes repaint a custom widget only through triggerDraw.
export function redraw(node, w) {
  node.setDirtyCanvas(true, true);
  w?.triggerDraw?.();
}

// Grow the node to its widgets' size (and minWidth).
export function grow(node, minWidth = 0) {
  const s = node.computeSize();
  node.setSize([Math.max(node.size[0], s[0], minWidth), Math.max(node.size[1], s[1])]);
}

// Chain fn after obj[key]; an error in fn only warns.
export function chain(obj, key, what, fn) {
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

export function roundRect(ctx, x, y, w, h, r) {
  ctx.beginPath();
  ctx.roundRect(x, y, w, h, r);
}

export function label(ctx, text, x, y, align = "left", col = null, font = "11px sans-serif") {
  ctx.font = font;
  ctx.textAlign = align;
  ctx.textBaseline = "middle";
  ctx.fillStyle = col ?? color("WIDGET_SECONDARY_TEXT_COLOR", "#999");
  ctx.fillText(text, x, y);
}

// A widget's own canvas (Vue nodes; the classic renderer draws on the graph canvas). Returns the width to draw at.
// Vue nodes before 1.33 let its pointer events bubble to the node, which then dragged the node away from under the
// pointer; the Vue nodes of 1.32.9 also lay their output preview over a tall widget's canvas, which then took the
// pointer: keep the events on the widget and its canvas on top. The Vue nodes of 1.53 size it from its zoomed width
// while pointer positions come in unzoomed CSS pixels: pin its height and scale back, so drawing and pointer agree.
function ownCanvas(ctx, width, height) {
  const el = ctx.canvas;
  if (el === app.canvas.canvas) return width;
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

// A custom widget, not serialized, over `parts`: paint(ctx, width, y, lowQuality) draws in the coordinates pointer
// positions come in (and records its hit boxes); a press that press(pos, e) answers "drag" starts a drag ("handled":
// consumed), dragTo(pos, e) applies it and release() (optional) ends it. The release position is ignored: Vue nodes
// report it relative to the node, not to the widget's canvas (which set lambda_pix to its minimum). A draw or input
// error only warns.
export function customWidget(node, name, parts) {
  const w = {
    name, type: name, value: null, options: { serialize: false }, serialize: false, y: 0, dragging: false, ...parts,

    draw(ctx, _node, width, y, H, lowQuality) {
      ctx.save();
      try {
        this.paint(ctx, ownCanvas(ctx, width, H), y, lowQuality);
      } catch (e) {
        warn(`${name} draw`, e);
      }
      ctx.restore();
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
          this.release?.();
          redraw(node, this);
          return true;
        } else if (!this.dragging || !/move$/.test(type)) {
          return false;
        }
        this.dragTo(pos, e);
        return true;
      } catch (err) {
        warn(`${name} input`, err);
        this.dragging = false;
        return false;
      }
    },
  };
  return node.addCustomWidget(w);
}
