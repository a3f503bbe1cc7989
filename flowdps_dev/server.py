"""Start ComfyUI's real server (``main.py``) on a free loopback port and talk to it over HTTP.

The server loads only our pack from ``custom_nodes`` (``--disable-all-custom-nodes`` plus a whitelist),
finds the tiny models through a generated ``extra_model_paths.yaml`` and writes into a private folder, so
it never touches a user's ComfyUI state. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .comfy_env import MODEL_KINDS, PACK_FOLDER, resolve_comfy_path

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_NODES_DIR = REPO_ROOT / "flowdps_dev" / "comfy_test_nodes"
TEST_NODES_PACKAGE = "flowdps_test_nodes"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """The server did not start, answered with an error, or a prompt did not finish in time."""


@dataclass
class PromptOutcome:
    """A finished prompt as ``/history`` reports it."""

    prompt_id: str
    status: str  # "success" or "error"
    outputs: dict[str, Any]
    messages: list
    seconds: float

    @property
    def error(self) -> dict | None:
        for event, data in self.messages:
            if event in ("execution_error", "execution_interrupted"):
                return data
        return None

    def images(self) -> list[dict]:
        return [img for out in self.outputs.values() for img in out.get("images", [])]


class ComfyServer:
    """A running ``main.py --cpu`` subprocess; use as a context manager or call :meth:`stop`.

    ``checkpoint_dirs`` adds folders to the checkpoint search path; ``cpu=False`` lets ComfyUI pick its GPU
    (with ``extra_args=("--cuda-device", "1")`` for a given one).
    """

    def __init__(self, comfy_path: str | os.PathLike | None = None, *, models_dir: str | os.PathLike | None = None,
                 work_dir: str | os.PathLike, port: int | None = None, python: str | None = None,
                 extra_args: tuple[str, ...] = (), checkpoint_dirs: tuple[str | os.PathLike, ...] = (),
                 cpu: bool = True, test_nodes: bool = False) -> None:
        self.comfy_dir = resolve_comfy_path(comfy_path)
        self.work_dir = Path(work_dir)
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = self.work_dir / "server.log"
        self.output_dir = self.work_dir / "output"
        models = models_dir or os.environ.get("FLOWDPS_MODELS")
        for sub in ("output", "input", "temp", "user"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "extra_model_paths.yaml"
        lines = ["flowdps_tests:"]
        if models:
            lines.append(f"  base_path: {Path(models).resolve()}")
            lines += [f"  {kind}: {kind}" for kind in MODEL_KINDS]
        else:
            lines.append(f"  base_path: {self.work_dir}")
        for i, folder in enumerate(checkpoint_dirs):  # extra folders searched for checkpoints (e.g. a user's file)
            lines += [f"flowdps_checkpoints_{i}:", f"  base_path: {Path(folder).resolve()}", "  checkpoints: ."]
        whitelist = [PACK_FOLDER]
        if test_nodes:  # the test-only loader of the tiny Flux / SD1.5 models (flowdps_dev/comfy_test_nodes)
            lines += ["flowdps_test_nodes:", f"  custom_nodes: {TEST_NODES_DIR}"]
            whitelist.append(TEST_NODES_PACKAGE)
        config.write_text("\n".join(lines) + "\n")
        self.cmd = [
            python or sys.executable, "main.py", *(["--cpu"] if cpu else []), "--listen", HOST, "--port", str(self.port),
            "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none",
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", *whitelist,
            "--extra-model-paths-config", str(config),
            "--output-directory", str(self.output_dir), "--input-directory", str(self.work_dir / "input"),
            "--temp-directory", str(self.work_dir / "temp"), "--user-directory", str(self.work_dir / "user"),
            "--database-url", "sqlite:///:memory:", *extra_args,
        ]
        self.proc: subprocess.Popen | None = None

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> ComfyServer:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # flowdps_dev importable by the test-only nodes
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self._log = open(self.log_path, "w")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(self.cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.25)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- HTTP --------------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def get_bytes(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def post(self, path: str, payload: Any, timeout: float = 30.0) -> tuple[int, Any]:
        """POST JSON; returns ``(status, body)`` for 2xx and 4xx answers alike."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except json.JSONDecodeError:
                return e.code, body.decode(errors="replace")

    def submit(self, prompt: dict) -> str:
        """Queue an API-format prompt; returns its id or raises :class:`ServerError` with the node errors."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        if status != 200:
            raise ServerError(f"/prompt answered {status}: {json.dumps(body)[:4000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> PromptOutcome:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry:
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return PromptOutcome(prompt_id, status.get("status_str", "?"), entry.get("outputs", {}),
                                         status.get("messages", []), time.monotonic() - t0)
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 300.0) -> PromptOutcome:
        return self.wait(self.submit(prompt), timeout)

    def view(self, image: dict) -> bytes:
        """The bytes of an image listed in a prompt's outputs (``/view``)."""
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        return self.get_bytes(f"/view?{query}")
