"""Python side of the real-frontend test: ComfyUI's web app in Debian's headless chromium.

:class:`Frontend` runs ``flowdps_dev/browser/run_workflows.mjs`` (playwright-core from the set-up's ``npm ci``)
against a running :class:`~flowdps_dev.server.ComfyServer` and talks to it in JSON lines: ``load`` a UI-format
workflow through ``app.loadGraphData`` and get back the frontend's own ``app.graphToPrompt()`` output (plus
missing node types, open dialogs and console errors), then ``queue`` an API prompt through the frontend's
client (``api.queuePrompt``) and wait for ``/history``, with a screenshot of the editor.

``open_template`` clicks through the template browser as a user does; ``view`` reports the editor's view (zoom,
level of detail, every node's box as the editor draws it, which nodes a user cannot see); ``search`` types into
the node search box.

``python -m flowdps_dev.frontend`` regenerates the README's screenshot (``docs/workflow_superres.png``): the
first workflow, opened from the template browser at its stored view with the editor's default settings, after a
1-step run on the tiny models.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "flowdps_dev" / "browser" / "run_workflows.mjs"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
# The server's user settings for the test: only that the first-start tutorial counts as done (otherwise the
# template browser covers the editor on the first page load). Everything else is the editor's default, as a new
# user has it: the level of detail (no text below about 57 % zoom), the minimap, one tab per workflow.
TEST_SETTINGS = {
    "Comfy.TutorialCompleted": True,
}


class FrontendError(RuntimeError):
    """The browser could not be started, or the script failed or did not answer in time."""


class FrontendUnavailableError(FrontendError):
    """chromium, node or playwright-core is not installed (``bash flowdps_dev/setup_browser.sh``)."""


def node_modules() -> Path:
    env = os.environ.get("FLOWDPS_NODE_MODULES")
    if env:
        return Path(env)
    return ROOT / ".cache" / "browser" / "node_modules"  # setup_browser.sh's default CACHE


def chromium_path() -> str:
    return os.environ.get("FLOWDPS_CHROMIUM", DEFAULT_CHROMIUM)


def check_installed() -> None:
    """Raise :class:`FrontendUnavailableError` naming what the set-up has not installed."""
    missing = []
    if not shutil.which("node"):
        missing.append("node (Node.js >= 20)")
    if not os.access(chromium_path(), os.X_OK):
        missing.append(f"chromium at {chromium_path()}")
    if not (node_modules() / "playwright-core" / "package.json").is_file():
        missing.append(f"playwright-core in {node_modules()}")
    if missing:
        raise FrontendUnavailableError(f"missing: {', '.join(missing)}; run bash flowdps_dev/setup_browser.sh")


def seed_user_settings(user_dir: Path, settings: dict[str, Any] | None = None) -> None:
    """Write the server's ``user/default/comfy.settings.json`` (read by the app on each page load)."""
    path = Path(user_dir) / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**current, **TEST_SETTINGS, **(settings or {})}, indent=1))


def write_placeholder_photos(input_dir: Path, workflows: list[Path], rgb: Any = None) -> list[str]:
    """Write the photo files the shipped LoadImage nodes name (``photo.png``, ...) into the server's
    input folder, as a user would have, so that the editor's image previews load (without them each preview
    is a console 404). ``rgb`` is an (H, W, 3) uint8 array; default a 64 px gradient."""
    import numpy as np
    from PIL import Image

    if rgb is None:
        rgb = np.zeros((64, 64, 3), np.uint8)
        rgb[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)[None]
        rgb[..., 1] = 120
    names = sorted({n["widgets_values"][0] for path in workflows
                    for n in json.loads(path.read_text(encoding="utf-8"))["nodes"] if n["type"] == "LoadImage"})
    for name in names:
        Image.fromarray(rgb).save(Path(input_dir) / name)
    return names


class Frontend:
    """One headless chromium with the ComfyUI app open; use as a context manager or call :meth:`close`."""

    def __init__(self, url: str, *, log_path: str | os.PathLike, viewport: tuple[int, int] = (1400, 900),
                 start_timeout: float = 180.0) -> None:
        check_installed()
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115  (closed in close())
        env = dict(os.environ, FLOWDPS_NODE_MODULES=str(node_modules()))
        cmd = ["node", str(SCRIPT), "--url", url, "--chromium", chromium_path(),
               "--width", str(viewport[0]), "--height", str(viewport[1])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env, cwd=ROOT, start_new_session=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.startup = self._answer(start_timeout)
        except FrontendError:
            self.close()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _answer(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise FrontendError(f"the browser script did not answer within {timeout:.0f} s:\n{self.log_tail()}") from None
        if line is None:
            self.proc.wait(timeout=10)
            raise FrontendError(f"the browser script exited with {self.proc.returncode}:\n{self.log_tail()}")
        answer = json.loads(line)
        if answer.get("ok") is False:
            raise FrontendError(f"the browser script failed: {answer.get('exception')}\n"
                                f"console errors: {answer.get('errors')}\n{self.log_tail()}")
        return answer

    def request(self, cmd: str, timeout: float = 120.0, **payload: Any) -> dict:
        if self.proc.poll() is not None:
            raise FrontendError(f"the browser script has exited ({self.proc.returncode}):\n{self.log_tail()}")
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **payload}) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def load(self, workflow: dict | None, name: str, *, template_module: str | None = None) -> dict:
        """Load a UI-format workflow like a user opening it; returns the frontend's findings and its prompt.
        With ``template_module`` (the pack's folder in custom_nodes) the page fetches ``<name>`` from the
        server's template route and loads that, as the template browser does."""
        if template_module:
            return self.request("load", name=Path(name).name,
                                template={"module": template_module, "name": Path(name).with_suffix("").as_posix()})
        return self.request("load", workflow=workflow, name=name)

    def open_template(self, module: str, name: str, *, timeout: float = 120.0) -> dict:
        """Open workflow ``name`` of pack folder ``module`` by clicking through the template browser; returns the
        pack's cards (names, texts, whether each picture loaded) and what :meth:`load` reports."""
        return self.request("open_template", timeout=timeout, module=module, name=name)

    def view(self, required: list[str] | None = None) -> dict:
        """The editor's view: scale, offset, level of detail, node boxes (title and badge included), the
        ``required`` node ids a user cannot see (``covered``) and the note's on-screen font sizes."""
        return self.request("view", required=list(required or []))

    def screen(self, width: int, height: int) -> dict:
        """Act in a tab whose window is ``width`` x ``height`` from now on (opened with the app on first use)."""
        return self.request("screen", timeout=180, width=width, height=height)

    def search(self, query: str) -> list[str]:
        """The node search box's results for ``query`` (each as the row's text)."""
        return self.request("search", query=query)["results"]

    def templates(self) -> dict[str, list[str]]:
        """The template browser's custom-node workflows: ``{pack folder: [names]}``."""
        return self.request("templates")["templates"]

    def queue(self, prompt: dict, *, screenshot: str | os.PathLike | None = None, timeout: float = 300.0) -> dict:
        """Queue an API prompt through the frontend's client with the loaded workflow; wait for /history."""
        return self.request("queue", timeout=timeout + 60, prompt=prompt, timeout_s=timeout,
                            screenshot=str(screenshot) if screenshot else None)

    def screenshot(self, path: str | os.PathLike, *, fit: bool = False) -> dict:
        """A screenshot of the page as it is (``fit``: after the editor's fit-view, which changes the zoom)."""
        return self.request("screenshot", path=str(path), fit=fit)

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------- one shipped workflow
@dataclass
class BrowserRun:
    """What happened to one workflow in the frontend: load findings, the prompts, the run and its images."""

    name: str
    loaded: dict  # the script's answer to `load` (missing_types, dialogs, errors, prompt, ...)
    run_prompt: dict = field(default_factory=dict)  # the frontend's prompt with the tiny substitutions
    queued: dict = field(default_factory=dict)  # the script's answer to `queue`
    history: dict = field(default_factory=dict)  # /history entry of the run
    image_sizes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # output node -> (w, h) each
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def prompt(self) -> dict:
        """The frontend's own graph-to-prompt output, as loaded (shipped names, no substitutions)."""
        return self.loaded.get("prompt") or {}

    def errors(self) -> list[str]:
        return [*self.loaded.get("errors", []), *self.queued.get("errors", [])]

    def execution_error(self) -> dict | None:
        for event, data in self.history.get("status", {}).get("messages", []):
            if event in ("execution_error", "execution_interrupted"):
                return data
        return None

    def problems(self) -> list[str]:
        """Everything a user would have seen go wrong, as readable lines (empty: the workflow is fine)."""
        out = []
        if self.loaded.get("missing_types"):
            out.append(f"missing node types: {self.loaded['missing_types']}")
        out += [f"missing-node dialog: {d}" for d in self.loaded.get("dialogs", []) if "missing" in d.lower()
                and "node" in d.lower() and "model" not in d.lower()]
        out += [f"console error: {e}" for e in self.errors()]
        if not self.queued:
            out.append("not queued")
        elif not self.queued.get("queued"):
            out.append(f"/prompt refused the frontend's prompt: {json.dumps(self.queued.get('error'))[:3000]}")
        elif self.queued.get("node_errors"):  # /prompt runs the outputs that validate and names the others
            out.append(f"/prompt found errors in the frontend's prompt: {json.dumps(self.queued['node_errors'])[:3000]}")
        elif not self.queued.get("finished"):
            out.append(f"the run did not finish within the time limit ({self.queued.get('seconds')} s)")
        elif self.history.get("status", {}).get("status_str") != "success":
            err = self.execution_error() or {}
            out.append(f"execution error in node {err.get('node_id')} ({err.get('node_type')}): "
                       f"{err.get('exception_type')}: {err.get('exception_message')}")
        return out


def _image_sizes(server, outputs: dict) -> dict[str, list[tuple[int, int]]]:
    from PIL import Image

    sizes = {}
    for node_id, out in outputs.items():
        for image in out.get("images", []):
            with Image.open(io.BytesIO(server.view(image))) as im:
                sizes.setdefault(node_id, []).append(im.size)
    return sizes


def run_workflow(fe: Frontend, server, path: Path, *, screenshot: Path | None = None, timeout: float = 600.0,
                 template_module: str | None = None, prepare: Callable[[dict], None] | None = None,
                 from_dialog: bool = False, before_run: Callable[[BrowserRun], None] | None = None) -> BrowserRun:
    """Open ``path`` in the editor and run it: by clicking its card in the template browser (``from_dialog``),
    or fetched from the server's template route (``template_module``, with ``path.name`` relative to it, e.g.
    ``more/x.json``) and loaded as a dropped file is, or loaded from disk. Then ``before_run(run)`` (checks of the
    opened view), the frontend's prompt with the tiny models and a test image substituted
    (:func:`flowdps_dev.workflow_fixtures.tiny_run_prompt`; then ``prepare(prompt)`` if given), queued from the
    page, and its images collected."""
    from .workflow_fixtures import tiny_run_prompt

    t0 = time.monotonic()
    if from_dialog:
        assert template_module, "the template browser needs the pack's folder name"
        loaded = fe.open_template(template_module, path.stem)
    elif template_module:  # the file as the server's template route serves it (sub-folders included)
        folder = ROOT / "example_workflows"
        relative = path.resolve().relative_to(folder) if path.resolve().is_relative_to(folder) else Path(path.name)
        loaded = fe.load(None, relative.as_posix(), template_module=template_module)
    else:
        loaded = fe.load(json.loads(path.read_text(encoding="utf-8")), path.name)
    run = BrowserRun(path.stem, loaded)
    run.seconds["load"] = round(time.monotonic() - t0, 2)
    if before_run is not None:
        before_run(run)
    if run.loaded.get("missing_types") or not run.prompt:
        return run
    run.run_prompt = tiny_run_prompt(server.work_dir / "input", run.prompt)
    if prepare is not None:
        prepare(run.run_prompt)
    t1 = time.monotonic()
    run.queued = fe.queue(run.run_prompt, screenshot=screenshot, timeout=timeout)
    run.seconds["run"] = round(time.monotonic() - t1, 2)
    if run.queued.get("finished"):
        run.history = server.get(f"/history/{run.queued['prompt_id']}")[run.queued["prompt_id"]]
        run.image_sizes = _image_sizes(server, run.history.get("outputs", {}))
    run.seconds["total"] = round(time.monotonic() - t0, 2)
    return run


# ------------------------------------------------------------------------------------ README screenshot
def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from . import demo
    from .comfy_env import PACK_FOLDER
    from .server import ComfyServer
    from .workflow_fixtures import loaded_image_side, of_type

    parser = argparse.ArgumentParser(description="Regenerate the README's screenshot of a workflow in the "
                                     "ComfyUI editor, after a 1-step run on the tiny random models.")
    parser.add_argument("--workflow", default=str(ROOT / "example_workflows" / "1 - Upscale a photo 4x (SD3).json"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "workflow_superres.png"))
    parser.add_argument("--work-dir", default=str(ROOT / "out" / "browser" / "screenshot_server"))
    parser.add_argument("--size", default="1366x768", help="viewport WIDTHxHEIGHT (default 1366x768)")
    parser.add_argument("--photo", choices=list(demo.PHOTOS), default="chelsea",
                        help="scikit-image photograph used as the user's photo (default chelsea, CC0)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    workflow = Path(args.workflow)
    photo = demo.photo_path(args.photo)
    work_dir = Path(args.work_dir)

    def user_photo(prompt: dict) -> None:
        """The run reads the photo too, at the size the test run needs (instead of the test gradient)."""
        side = loaded_image_side(prompt)
        name = f"photo_{args.photo}_{side}.png"
        Image.fromarray(demo.ground_truth(photo, side)).save(work_dir / "input" / name)
        for node_id in of_type(prompt, "LoadImage"):
            prompt[node_id]["inputs"]["image"] = name

    t0 = time.monotonic()
    with ComfyServer(work_dir=work_dir) as server:
        seed_user_settings(server.work_dir / "user")
        write_placeholder_photos(server.work_dir / "input", [workflow], demo.ground_truth(photo, 256))
        with Frontend(server.url, log_path=work_dir / "browser.log", viewport=(width, height)) as fe:
            run = run_workflow(fe, server, workflow, screenshot=Path(args.out), prepare=user_photo,
                               template_module=PACK_FOLDER, from_dialog=workflow.parent.name != "more")
    for problem in run.problems():
        print("problem:", problem)
    print(json.dumps({"screenshot": args.out, "bytes": Path(args.out).stat().st_size if Path(args.out).exists()
                      else None, "seconds": round(time.monotonic() - t0, 1), "run": run.seconds}))
    return 1 if run.problems() else 0


if __name__ == "__main__":
    raise SystemExit(main())
