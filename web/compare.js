// Before / after slider on PiSA Tiled VAE Decode, over its `images` (result) and `pisa_lq` (resized LQ) previews
// (nodes/preview.py). If they cannot be loaded, the front end's ordinary preview takes over. After a run it also
// draws the live preview (live.js) over the result side, and a 1:1 loupe while the pointer is held on the picture.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { decoderOutput, requestPreview, samplerLambdas } from "./live.js";
import { chain, clamp, color, customWidget, findWidget, grow, inside, label, redraw, roundRect, SMALL, warn }
  from "./widget.js";

const COMPARE = "pisa_sr_compare";
const HOLD_MS = 400; // a press held this long without moving opens the loupe
const LOUPE = 256; // side of the loupe's 1:1 crop, output px (at most half the picture's side)
const TIP = "Drag to compare input and result. After a run, moving the sampler's lambdas previews them here; " +
  "press and hold on the picture for a 1:1 loupe.";

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => reject(new Error(`could not load ${src.slice(0, 80)}`));
    im.src = src;
  });
}

function loadView(img) {
  const q = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder ?? "", type: img.type ?? "temp" });
  return loadImage(api.apiURL(`/view?${q}${app.getRandParam()}`));
}

function addCompare(node) {
  return customWidget(node, COMPARE, { // paint() sets rect (the image, {x, y, w, h}) and navBox
    tooltip: TIP,
    split: 0.5, // fraction of the image width showing the "before" (resized LQ)
    index: 0,
    after: [], // result previews (Image)
    before: [], // resized LQ previews (Image)
    // live preview of this run (liveUpdate): { preview, loupe: {img, src, ...the event}, status, error, seq }
    live: {},
    // also: outputs (the node output these came from), ready, failed, hold (a press: {x, y, moved, timer}),
    // loupeAt (the held point while the loupe shows), outSize (the output's [width, height])

    async load(output) {
      this.outputs = output; // the previous pair stays on screen until the new one has loaded
      this.failed = false;
      this.live = {}; // a real run: its result replaces any preview
      this.outSize = null;
      decoderOutput(node, output);
      const tag = (this.loadTag = {});
      try {
        const [after, before] = await Promise.all(
          [output.images, output.pisa_lq].map((list) => Promise.all(list.map(loadView))));
        if (tag !== this.loadTag) return;
        this.after = after;
        this.before = before;
        this.index = Math.min(this.index, after.length - 1);
        this.ready = true;
        node.imgs = after; // keeps the node's "Open Image" / "Save Image" menu entries working
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
      const preview = this.live.preview;
      const after = preview?.img ?? this.after[this.index];
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
      const lam = (p) => `\u03bb_pix ${p.lambda_pix.toFixed(2)} \u03bb_sem ${p.lambda_sem.toFixed(2)}`;
      if (this.split < 0.98) tag(preview ? `preview: ${lam(preview)}` : "after: PiSA-SR", x + w - 4, "right");
      if (preview) { // clearly not the node's output: an orange frame round the result side
        ctx.strokeStyle = "#ffb347";
        ctx.lineWidth = 2;
        ctx.strokeRect(sx + 1, top + 1, x + w - sx - 2, h - 2);
      }
      this.paintLoupe(ctx);
      const n = this.after.length, ty = top + h + 11, { status, error } = this.live;
      const cap = error ? `preview error: ${error}` : status ? `${status}\u2026`
        : `${after.naturalWidth}\u00d7${after.naturalHeight} ${preview ? "live preview" : "preview"}` +
          ` \u00b7 drag to compare${node.pisaLive ? " \u00b7 hold for loupe" : ""}`;
      label(ctx, cap, width / 2, ty, "center", error ? "#f66" : status ? "#ffb347" : null, SMALL);
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
      if (!(x >= r.x && x <= r.x + r.w && y >= r.y && y <= r.y + r.h)) return false;
      clearTimeout(this.hold?.timer);
      this.hold = { x, y, moved: false };
      if (node.pisaLive) this.hold.timer = setTimeout(() => this.openLoupe(), HOLD_MS);
      return "drag";
    },

    // Moving splits (or moves the loupe while it shows); a press held still opens the loupe; a click moves the split.
    dragTo([x, y]) {
      const h = this.hold;
      if (this.loupeAt) {
        this.loupeAt = [x, y];
        this.askLoupe();
      } else if (h && !h.moved && Math.abs(x - h.x) + Math.abs(y - h.y) < 4) {
        return;
      } else {
        if (h) { h.moved = true; clearTimeout(h.timer); }
        this.split = clamp((x - this.rect.x) / this.rect.w, 0, 1);
      }
      redraw(node, this);
    },

    release() {
      const h = this.hold;
      this.hold = null;
      clearTimeout(h?.timer);
      if (this.loupeAt) {
        this.loupeAt = null;
        this.live.loupe = null;
      } else if (h && !h.moved && this.rect) {
        this.split = clamp((h.x - this.rect.x) / this.rect.w, 0, 1);
      }
    },

    openLoupe() {
      if (!this.hold || this.hold.moved) return;
      this.loupeAt = [this.hold.x, this.hold.y];
      this.askLoupe();
      redraw(node, this);
    },

    // Ask for the loupe at the held point, in output pixels (the preview's size until an answer tells the output's).
    askLoupe() {
      const token = node.pisaLive, r = this.rect, im = this.after[this.index];
      const p = this.live.preview, lambdas = samplerLambdas(token) ?? (p && { pix: p.lambda_pix, sem: p.lambda_sem });
      if (!token || !r || !im || !lambdas) return;
      const [ow, oh] = this.outSize ?? [im.naturalWidth, im.naturalHeight];
      const [px, py] = this.loupeAt;
      const at = (f, n) => Math.min(n - 1, Math.round(clamp(f, 0, 1) * n));
      requestPreview(token, lambdas, "loupe", { decoder: node.id, frame: this.index,
        size: Math.max(16, Math.round(Math.min(LOUPE, ow / 2, oh / 2))), x: at((px - r.x) / r.w, ow),
        y: at((py - r.y) / r.h, oh) });
    },

    // The loupe: its crop outlined on the picture and drawn as an inset in the corner away from the pointer.
    paintLoupe(ctx) {
      const l = this.live.loupe, r = this.rect;
      if (!this.loupeAt || !l?.img) return;
      const k = r.w / l.out_width;
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = 1;
      ctx.strokeRect(r.x + l.x0 * k, r.y + l.y0 * k, l.width * k, l.height * k);
      const side = Math.min(r.w, r.h) * 0.6, s = side / Math.max(l.width, l.height);
      const iw = l.width * s, ih = l.height * s;
      const ix = this.loupeAt[0] < r.x + r.w / 2 ? r.x + r.w - iw - 6 : r.x + 6;
      const iy = this.loupeAt[1] < r.y + r.h / 2 ? r.y + r.h - ih - 6 : r.y + 22;
      ctx.imageSmoothingEnabled = false; // output pixels stay square
      ctx.drawImage(l.img, ix, iy, iw, ih);
      ctx.imageSmoothingEnabled = true;
      ctx.strokeStyle = "#ffb347";
      ctx.lineWidth = 2;
      ctx.strokeRect(ix, iy, iw, ih);
      label(ctx, "1:1 loupe", ix + 4, iy + ih - 8, "left", "#fff", SMALL);
    },

    // What live.js reports for this decoder's run: { preview: event } | { status, seq } | { error, seq } | { clear }.
    async liveUpdate(what) {
      if (what.clear) {
        this.live = {};
      } else if (what.preview) {
        const d = what.preview, key = d.view === "loupe" ? "loupe" : "preview", img = await loadImage(d.image);
        if (this.live[key]?.seq > d.seq || (key === "loupe" && !this.loupeAt)) return; // a newer one loaded first
        this.live = { ...this.live, [key]: { ...d, img, src: d.image }, status: null, error: null };
        const im = this.after[this.index], aimed = this.outSize ?? [im?.naturalWidth, im?.naturalHeight];
        this.outSize = [d.out_width, d.out_height];
        if (d.view === "loupe" && aimed[0] !== d.out_width) this.askLoupe(); // it aimed at the preview's size
      } else if (what.seq >= (this.live.preview?.seq ?? 0)) {
        this.live = { ...this.live, status: what.status ?? null, error: what.error ?? null };
      }
      redraw(node, this);
    },
  });
}

const hasComparison = (output) => [output?.images, output?.pisa_lq].every((l) => Array.isArray(l) && l.length > 0);

function showComparison(node, output) {
  let w = findWidget(node, COMPARE);
  if (!w) {
    w = addCompare(node);
    grow(node); // give the preview room
  }
  if (w.outputs !== output) w.load(output);
  return w;
}

// The classic renderer's image preview is a widget the front end adds from the node's onDrawBackground (which this
// node's own skips while the slider shows). One added before, while a failed load let it in, has no public way out
// (front end 1.32.9 to 1.58.1): it is found by the front end's name for it.
function removeFrontEndPreview(node) {
  const w = findWidget(node, "$$canvas-image-preview");
  if (w) node.removeWidget(w);
}

export function setupCompare(node) {
  // The slider is the decoder's preview: Vue nodes must not add their own. Set before the first run, as that renderer
  // decides when the output arrives (1.32.9 ignores the flag).
  node.hideOutputImages = true;
  chain(node, "onExecuted", "onExecuted", function (output) {
    if (hasComparison(output)) showComparison(this, output);
  });
  const drawPreview = node.onDrawBackground;
  node.onDrawBackground = function (...args) {
    try {
      // outputs restored from the front end's store (e.g. after switching workflow tabs)
      let w = findWidget(this, COMPARE);
      const out = w ? null : app.nodeOutputs?.[String(this.id)];
      if (hasComparison(out)) w = showComparison(this, out);
      if (w && !w.failed) return removeFrontEndPreview(this);
    } catch (e) {
      warn("preview", e);
    }
    return drawPreview?.apply(this, args);
  };
}
