// ComfyUI-PiSA-SR front end, on the public extension API of ComfyUI frontend 1.x: the fidelity / perception pad on
// the sampler (pad.js) and the before / after slider on the decoder (compare.js), over one widget base (widget.js);
// after a run, lambda edits preview their result on the decoder (live.js).
// Without this file the graph works unchanged (plain number widgets; the decoder shows an ordinary preview).
import { app } from "../../scripts/app.js";
import { addPad, padSpec } from "./pad.js";
import { setupCompare } from "./compare.js";
import { watchSampler } from "./live.js";

const pads = new Map(); // node type -> its lambdas' input options

app.registerExtension({
  name: "comfyui-pisa-sr.ui",
  beforeRegisterNodeDef(_nodeType, nodeData) {
    const spec = padSpec(nodeData);
    if (spec) pads.set(nodeData.name, spec);
  },
  nodeCreated(node) {
    const type = node.comfyClass ?? node.type;
    if (pads.has(type)) {
      addPad(node, pads.get(type));
      watchSampler(node);
    }
    if (type === "PiSA_Decode") setupCompare(node);
  },
});
