"""Run a real headless ComfyUI server (``main.py --cpu``) with this pack installed, and talk to it over HTTP.

Used by the example runner and by the real-server tests. Standard library only.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "ComfyUI-PiSA-SR"
# Last-resort hang guards only, far above any honest run on a busy machine: a slow machine must never fail a test.
HANG_GUARD_S = 3600.0
HTTP_GUARD_S = 600.0
# A library preloaded into the server only (not into the caller), e.g. Debian's tcmalloc: scripts/run_tests.sh sets it.
PRELOAD_VAR = "PISA_SERVER_PRELOAD"
_LIVE: set[subprocess.Popen] = set()  # servers still running, killed when this process ends


def _kill_live() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()


def _on_sigterm(signum, frame) -> None:
    """A killed test run takes its servers with it (no orphaned main.py holding ports and GiBs)."""
    _kill_live()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


atexit.register(_kill_live)
if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _on_sigterm)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_files(prompt: dict, ckpt: str, pisa: str, image: str) -> dict:
    """Point an example API prompt's loaders at these files (by base name, as ComfyUI lists them); in place."""
    names = {"CheckpointLoaderSimple": ("ckpt_name", ckpt), "PiSA_LoadLoRAs": ("lora_name", pisa),
             "LoadImage": ("image", image)}
    for node in prompt.values():
        if node["class_type"] in names:
            key, path = names[node["class_type"]]
            node["inputs"][key] = os.path.basename(path)
    return prompt


class PromptFailed(RuntimeError):
    def __init__(self, message: str, entry: dict | None = None):
        super().__init__(message)
        self.entry = entry


class ComfyServer:
    """``with ComfyServer(models={"checkpoints": [path], "pisa_sr": [path]}) as srv: srv.run(prompt)``."""

    def __init__(self, comfy_dir: str | None = None, python: str | None = None, base: str | None = None,
                 models: dict[str, list[str]] | None = None, inputs: list[str] | None = None,
                 extra_args: list[str] | None = None, pack_dir: Path = REPO, link_pack: bool = True,
                 cpu: bool = True):
        self.comfy_dir = Path(comfy_dir or os.environ["PISA_COMFY_DIR"])
        self.python = python or os.environ.get("PISA_HOST_PYTHON") or sys.executable
        self._own_base = base is None
        self.base = Path(base or tempfile.mkdtemp(prefix="pisa-server-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.extra_args = extra_args or []
        self.cpu = cpu  # False: ComfyUI picks the accelerator (scripts/gpu_check.py)
        for sub in ("custom_nodes", "input", "output", "user/default", "models/checkpoints", "models/pisa_sr"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        if link_pack:
            link = self.base / "custom_nodes" / PACK_NAME
            if not link.exists():
                link.symlink_to(pack_dir, target_is_directory=True)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        for folder, paths in (models or {}).items():
            (self.base / "models" / folder).mkdir(parents=True, exist_ok=True)
            for p in paths:
                dst = self.base / "models" / folder / os.path.basename(p)
                if not dst.exists():
                    dst.symlink_to(os.path.abspath(p))
        for p in inputs or []:
            shutil.copy(p, self.base / "input" / os.path.basename(p))
        self.log_path = self.base / "server.log"

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def start(self, timeout: float = HANG_GUARD_S) -> "ComfyServer":
        cmd = [self.python, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
               "--dont-print-server", *self.extra_args]
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if os.environ.get(PRELOAD_VAR):  # the test runner's allocator for servers (scripts/run_tests.sh)
            env["LD_PRELOAD"] = os.environ[PRELOAD_VAR]
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        _LIVE.add(self.proc)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.proc is not None:
            _LIVE.discard(self.proc)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextlib.contextmanager
    def running(self) -> Iterator["ComfyServer"]:
        """A script's server: started; on an error its log tail goes to stderr; stopped and its folder removed after."""
        try:
            with self:
                yield self
        except Exception:
            print("server log tail:\n" + self.log_tail(), file=sys.stderr)
            raise
        finally:
            self.cleanup()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # ---- HTTP ----------------------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = HTTP_GUARD_S) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def get_bytes(self, path: str, timeout: float = HTTP_GUARD_S) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def post(self, path: str, payload: dict | None = None, timeout: float = HTTP_GUARD_S) -> dict:
        data = json.dumps(payload or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise PromptFailed(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:2000]}") from None
        return json.loads(body) if body else {}

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = HANG_GUARD_S) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt; log:\n{self.log_tail()}")
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id) if hist else None
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    msgs = [m for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
                    raise PromptFailed(f"prompt {prompt_id} ended with {status.get('status_str')}: "
                                       f"{json.dumps(msgs)[:3000]}", entry)
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s; log:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = HANG_GUARD_S) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def output_images(self, entry: dict) -> list[Path]:
        out = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                if img.get("type") == "output":
                    out.append(self.base / "output" / img.get("subfolder", "") / img["filename"])
        return out

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0
