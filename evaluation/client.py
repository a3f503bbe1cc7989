"""A minimal client of ComfyUI's own HTTP API (standard library only): the evaluation talks to ComfyUI only here.

Endpoints used: ``GET /system_stats`` (reachability), ``GET /object_info`` (node schemas, checkpoint names),
``POST /upload/image`` (multipart), ``POST /prompt``, ``GET /history/{id}``, ``GET /view``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any


class ComfyClientError(RuntimeError):
    """A server is unreachable, refused a request, or a prompt failed or timed out."""


@dataclass(frozen=True)
class Finished:
    """A finished prompt: its id, output images (``/history`` entries) per node id, and the wall time."""

    prompt_id: str
    images: dict[str, list[dict]]
    seconds: float


def normalise_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port``; rejects other schemes."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"server URL {url!r} is not an http(s)://host:port address")
    return url


class ComfyClient:
    """One ComfyUI server, addressed by its base URL (``http://127.0.0.1:8188``)."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = normalise_url(url)
        self.timeout = timeout
        self.client_id = str(uuid.uuid4())

    def __repr__(self) -> str:
        return f"ComfyClient({self.url!r})"

    def _open(self, request: urllib.request.Request | str, timeout: float | None = None) -> bytes:
        target = request if isinstance(request, str) else request.full_url
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")[:4000]
            raise ComfyClientError(f"{target} answered HTTP {e.code}: {body}") from e
        except (urllib.error.URLError, OSError) as e:
            raise ComfyClientError(f"ComfyUI server {self.url} is unreachable ({target}): {e}") from e

    def get_json(self, path: str, timeout: float | None = None) -> Any:
        return json.loads(self._open(self.url + path, timeout))

    def post_json(self, path: str, payload: Any) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        body = self._open(request)
        return json.loads(body) if body else None

    # -- API ---------------------------------------------------------------------------------------------
    def check(self) -> dict:
        """``/system_stats``; raises :class:`ComfyClientError` naming the URL when the server does not answer."""
        stats = self.get_json("/system_stats", timeout=10)
        if not isinstance(stats, dict) or "system" not in stats:
            raise ComfyClientError(f"{self.url} answered /system_stats without a 'system' entry: is it ComfyUI?")
        return stats

    def object_info(self) -> dict[str, dict]:
        return self.get_json("/object_info", timeout=120)

    def upload_image(self, name: str, data: bytes) -> str:
        """Upload PNG bytes into the server's input folder as ``name`` (overwriting); returns the name to load."""
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n",
            f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="type"\r\n\r\ninput\r\n'.encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        request = urllib.request.Request(self.url + "/upload/image", data=b"".join(parts),
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        answer = json.loads(self._open(request))
        sub = answer.get("subfolder") or ""
        return f"{sub}/{answer['name']}" if sub else answer["name"]

    def submit(self, prompt: dict) -> str:
        """Queue an API prompt; returns its id (node errors are raised with the server's message)."""
        answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if not answer or "prompt_id" not in answer:
            raise ComfyClientError(f"{self.url} /prompt answered without a prompt_id: {answer}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float, poll: float = 0.25) -> Finished:
        """Poll ``/history/{id}`` until the prompt finished; raises on an error status or after ``timeout`` s."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status", {})
            if status.get("status_str") == "error":
                messages = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                detail = messages[0][1] if messages else status
                if isinstance(detail, dict):
                    detail = {k: detail.get(k) for k in ("node_type", "exception_type", "exception_message")}
                raise ComfyClientError(f"{self.url}: prompt {prompt_id} failed: {detail}")
            if entry and (status.get("completed") or status.get("status_str") == "success"):
                images = {node: out.get("images", []) for node, out in entry.get("outputs", {}).items()}
                return Finished(prompt_id, images, time.monotonic() - start)
            time.sleep(poll)
        raise ComfyClientError(f"{self.url}: prompt {prompt_id} did not finish within {timeout:.0f} s")

    def view(self, image: dict) -> bytes:
        """The bytes of an output image listed in ``/history``."""
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        return self._open(f"{self.url}/view?{query}", timeout=120)

    def history_count(self) -> int:
        """Prompts in the server's history (all clients)."""
        return len(self.get_json("/history"))
