"""Hostile LoRA files through a real ComfyUI server (issue 11, finding 1): every prompt fails with the loader's clear
message, and the server keeps answering HTTP throughout (a hang in torch's unpickler would freeze it whole)."""
from __future__ import annotations

import sys
import threading
import time

import pytest

import host
from hostile_files import DIFFERENTIAL, PAYLOADS, pickle_zip

sys.path.insert(0, str(host.REPO / "scripts"))
import make_tiny_weights  # noqa: E402
from comfy_server import ComfyServer, PromptFailed  # noqa: E402

pytestmark = pytest.mark.slow
MAX_ANSWER_S = 1.0


def error_of(srv: ComfyServer, ckpt: str, lora: str) -> str:
    """Run the graph; it must fail in Load PiSA LoRAs. Returns the exception message the user sees."""
    with pytest.raises(PromptFailed) as ei:
        srv.run({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
                 "2": {"class_type": "PiSA_LoadLoRAs", "inputs": {"model": ["1", 0], "lora_name": lora}},
                 "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}, timeout=300)
    errors = [m[1] for m in ei.value.entry["status"]["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_type"] == "PiSA_LoadLoRAs", errors
    return errors[0]["exception_message"]


def test_hostile_files_fail_cleanly_while_the_server_keeps_answering(tmp_path):
    ckpt, _ = make_tiny_weights.make(make_tiny_weights.cache_dir())
    files = {f"hostile_{fam}_{pay}.pkl": build(PAYLOADS[pay]) for fam, build in DIFFERENTIAL.items()
             for pay in PAYLOADS}
    files["hostile_plain_dag-key.pkl"] = pickle_zip(PAYLOADS["dag-key"])
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    srv = ComfyServer(models={"checkpoints": [ckpt], "pisa_sr": [str(tmp_path / n) for n in files]})
    ckpt_name = ckpt.rsplit("/", 1)[-1]
    answers: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                srv.get("/system_stats", timeout=60)
                answers.append(time.perf_counter() - t0)
            except OSError:  # no answer at all counts as the slowest one
                answers.append(float("inf"))
            stop.wait(0.02)

    try:
        with srv:
            error_of(srv, ckpt_name, next(iter(files)))  # loads the base checkpoint once; not what is measured
            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            for name in files:
                msg = error_of(srv, ckpt_name, name)
                assert msg.startswith(f"Load PiSA LoRAs: PiSA-SR checkpoint '{name}':"), msg
                assert "Download" in msg or "pisa_sr.convert" in msg, msg
                assert "weights_only" not in msg and "Traceback" not in msg, msg
            stop.set()
            poller.join(timeout=120)
    finally:
        stop.set()
        srv.cleanup()
    print(f"\n/system_stats: {len(answers)} answers, slowest {max(answers) * 1000:.0f} ms")
    assert answers and max(answers) < MAX_ANSWER_S, sorted(answers)[-5:]
