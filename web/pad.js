// Fidelity / perception pad on the sampler (any node with FLOAT lambda_pix and lambda_sem): x = lambda_sem,
// y = lambda_pix. Dragging sets both (snapped to their step, clamped to their min/max), typed edits move the dot, and
// their default is marked. Range, step and default are the backend's (the node definition's input options).
import { app } from "../../scripts/app.js";
import { chain, clamp, color, customWidget, findWidget, grow, inside, label, redraw, roundRect, SMALL, TINY }
  from "./widget.js";

const PIX = "lambda_pix", SEM = "lambda_sem", PAD = "pisa_sr_pad";
const HEIGHT = 230;
const FAINT = "rgba(255,255,255,0.35)";

// The lambdas' input options ({min, max, step, default}) from a node definition, or null when it has no such pair.
export function padSpec(nodeData) {
  const ins = { ...nodeData.input?.required, ...nodeData.input?.optional };
  const [pix, sem] = [PIX, SEM].map((k) => ins[k]?.[0] === "FLOAT" && ins[k][1]);
  const ok = (o) => o && o.max > o.min && o.step > 0 && o.default >= o.min && o.default <= o.max;
  return ok(pix) && ok(sem) ? { pix, sem } : null;
}

const snap = (v, o) => Number(clamp(Math.round(v / o.step) * o.step, o.min, o.max).toFixed(4));
const isLinked = (node, name) => node.inputs?.find((i) => i.name === name || i.widget?.name === name)?.link != null;

export function addPad(node, spec) {
  if (findWidget(node, PAD)) return;
  const { pix: P, sem: S } = spec;
  const pad = customWidget(node, PAD, { // paint() sets box (the pad) and resetBox (the "default" button)
    computeSize: (width) => [width ?? node.size[0], HEIGHT],

    axes() {
      const wp = findWidget(node, PIX), ws = findWidget(node, SEM);
      return wp && ws ? { wp, ws, linked: isLinked(node, PIX) || isLinked(node, SEM) } : null;
    },

    toXY(pix, sem) {
      const b = this.box;
      return [b.x0 + ((sem - S.min) / (S.max - S.min)) * (b.x1 - b.x0),
              b.y1 - ((pix - P.min) / (P.max - P.min)) * (b.y1 - b.y0)];
    },

    setLambdas(pix, sem, e) {
      const a = this.axes();
      if (!a || a.linked) return;
      for (const [w, v] of [[a.wp, snap(pix, P)], [a.ws, snap(sem, S)]]) {
        if (w.value !== v) w.setValue(v, { e, node, canvas: app.canvas }); // as an edit: callback, graph change
      }
      redraw(node, this);
    },

    paint(ctx, width, y, lowQuality) {
      const a = this.axes();
      const x0 = 34, x1 = Math.max(x0 + 40, width - 14);
      const y0 = y + 24, y1 = y + HEIGHT - 26, xm = (x0 + x1) / 2, ym = (y0 + y1) / 2;
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
      for (let s = Math.ceil(S.min); s <= S.max; s++) {
        const [gx] = this.toXY(P.min, s);
        line(s, gx, y0, gx, y1);
        if (!lowQuality) label(ctx, String(s), gx + 2, y1 - 7, "left", FAINT, TINY);
      }
      for (let p = Math.ceil(P.min); p <= P.max; p++) {
        const [, gy] = this.toXY(p, S.min);
        line(p, x0, gy, x1, gy);
        if (!lowQuality && p > Math.ceil(P.min)) label(ctx, String(p), x1 - 3, gy - 6, "right", FAINT, TINY);
      }
      if (!lowQuality) {
        label(ctx, "\u2191 clean harder", x0 + 5, y0 + 9, "left", dim, SMALL);
        label(ctx, "\u2193 keep input", x0 + 5, y1 - 20, "left", dim, SMALL);
      }
      ctx.restore();
      // the default setting
      const [dx, dy] = this.toXY(P.default, S.default);
      ctx.setLineDash([3, 3]);
      ctx.strokeStyle = "rgba(255,255,255,0.7)";
      ctx.beginPath(); ctx.arc(dx, dy, 8, 0, Math.PI * 2); ctx.stroke();
      ctx.setLineDash([]);
      if (!lowQuality) label(ctx, "release default", dx + 11, dy - 9, "left", "rgba(255,255,255,0.75)", TINY);
      // the current setting
      const pix = Number(a.wp.value), sem = Number(a.ws.value);
      if (Number.isFinite(pix) && Number.isFinite(sem)) {
        const [cx, cy] = this.toXY(clamp(pix, P.min, P.max), clamp(sem, S.min, S.max));
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
        this.setLambdas(P.default, S.default, e);
        return "handled";
      }
      if (!inside(this.box, x, y, 4)) return false;
      const a = this.axes();
      return a && !a.linked ? "drag" : false;
    },

    dragTo([x, y], e) {
      const b = this.box;
      this.setLambdas(P.min + ((b.y1 - y) / (b.y1 - b.y0)) * (P.max - P.min),
                      S.min + ((x - b.x0) / (b.x1 - b.x0)) * (S.max - S.min), e);
    },
  });
  // typed edits redraw the pad (Vue nodes repaint a custom widget only when asked)
  for (const name of [PIX, SEM]) chain(findWidget(node, name) ?? {}, "callback", "widget edit", () => redraw(node, pad));
  grow(node, 300);
}
