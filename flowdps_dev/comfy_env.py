"""A real ComfyUI inside this Python process: bootstrap it once, then run API-format graphs.

Used by the tests, ``make demo`` and the evaluation runner. ComfyUI is not a package: its folder goes on
``sys.path`` and its top-level modules (``nodes``, ``execution``, ``folder_paths``, ``comfy`` ...) are
imported as ComfyUI's own ``main.py`` does, with three start-up rules that matter:

1. ``comfy.cli_args.args`` (CPU mode, custom-node whitelist) is set before anything imports
   ``comfy.model_management``, which picks the torch device at import time;
2. ``utils.extra_config`` is imported before ``nodes``: ``nodes.py`` puts ``<ComfyUI>/comfy`` first on
   ``sys.path``, after which a bare ``import utils`` would find ``comfy/utils.py``;
3. our pack is loaded by ComfyUI's own custom-node loader from ``custom_nodes/comfyui-flowdps`` (a link
   made by the set-up), exactly as a user's install is loaded, with every other custom node disabled.

Graphs then run through ``execution.PromptExecutor`` (which wraps everything in
``torch.inference_mode()``, like the server), and :class:`GraphResult` gives the raw output values of every
node, the UI outputs (saved image files) and a readable error.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACK_FOLDER = "comfyui-flowdps"
MODEL_KINDS = ("diffusion_models", "vae", "text_encoders", "checkpoints")


class ComfyNotFoundError(RuntimeError):
    """No usable ComfyUI tree: COMFYUI_PATH is unset or wrong (run `make setup`)."""


class GraphValidationError(RuntimeError):
    """ComfyUI refused the prompt before running it (``validate_prompt`` failed)."""


def resolve_comfy_path(path: str | os.PathLike | None = None) -> Path:
    """The ComfyUI tree from ``path`` or ``$COMFYUI_PATH``; raises :class:`ComfyNotFoundError`."""
    raw = path if path is not None else os.environ.get("COMFYUI_PATH")
    if not raw:
        raise ComfyNotFoundError("COMFYUI_PATH is not set; run `make setup` (or `make test`) first")
    comfy = Path(raw).resolve()
    if not (comfy / "main.py").is_file() or not (comfy / "nodes.py").is_file():
        raise ComfyNotFoundError(f"COMFYUI_PATH={raw!s} is not a ComfyUI tree (expected main.py and nodes.py)")
    return comfy


def add_comfy_to_path(path: str | os.PathLike | None = None, *, cpu: bool | None = None) -> Path:
    """Put ComfyUI on ``sys.path`` and choose the device before ``comfy.model_management`` is imported.

    ``cpu=None`` means: CPU when torch sees no CUDA device. Returns the ComfyUI folder.
    """
    comfy = resolve_comfy_path(path)
    if str(comfy) not in sys.path:
        sys.path.insert(0, str(comfy))
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    from comfy.cli_args import args

    if "comfy.model_management" in sys.modules and bool(args.cpu) != bool(cpu):
        raise RuntimeError("comfy.model_management was already imported with another device choice")
    args.cpu = bool(cpu)
    return comfy


class _RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


class _StubServer:
    """The few attributes of ``server.PromptServer`` that ``PromptExecutor`` touches."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


@dataclass
class GraphError:
    """Where and why a graph failed."""

    node_id: str | None
    node_type: str | None
    exception_type: str
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        where = f"node {self.node_id} ({self.node_type})" if self.node_id else "graph"
        return f"{where}: {self.exception_type}: {self.message}"


@dataclass
class GraphResult:
    """Outcome of one prompt: raw node outputs, UI outputs and, on failure, the error."""

    prompt_id: str
    success: bool
    outputs: dict[str, list] = field(default_factory=dict)
    ui: dict[str, dict] = field(default_factory=dict)
    error: GraphError | None = None
    output_dir: Path | None = None
    messages: list[tuple[str, Any]] = field(default_factory=list)

    def output(self, node_id: str, index: int = 0) -> Any:
        """The value of output ``index`` of node ``node_id`` (first batch entry of ComfyUI's output list)."""
        values = self.outputs[str(node_id)]
        return values[index][0] if isinstance(values[index], list) else values[index]

    def image_files(self, node_id: str | None = None) -> list[Path]:
        """Files written by image-saving nodes (all of them, or those of ``node_id``)."""
        files = []
        for nid, ui in self.ui.items():
            if node_id is not None and nid != str(node_id):
                continue
            for img in (ui or {}).get("images", []):
                if img.get("type", "output") == "output":
                    files.append(Path(self.output_dir or ".") / img.get("subfolder", "") / img["filename"])
        return files

    def raise_for_error(self) -> GraphResult:
        if not self.success:
            raise RuntimeError(f"graph failed: {self.error}\n{self.error.traceback if self.error else ''}")
        return self


class ComfySession:
    """ComfyUI loaded in this process with the pack; create it with :func:`start` (one per process)."""

    def __init__(self, comfy_dir: Path, models_dir: Path | None, work_dir: Path, load_log: list[str]) -> None:
        import execution
        import folder_paths

        import nodes

        self.comfy_dir = comfy_dir
        self.models_dir = models_dir
        self.work_dir = work_dir
        self.load_log = load_log
        self._execution = execution
        self._nodes = nodes
        self._folder_paths = folder_paths
        self._server = _StubServer()
        self._executor = self._new_executor()

    @property
    def output_dir(self) -> Path:
        return Path(self._folder_paths.get_output_directory())

    @property
    def input_dir(self) -> Path:
        return Path(self._folder_paths.get_input_directory())

    @property
    def node_classes(self) -> dict[str, type]:
        return self._nodes.NODE_CLASS_MAPPINGS

    def node_info(self, class_type: str) -> dict[str, Any]:
        """``class_type``'s entry as ComfyUI's ``GET /object_info`` reports it (server.py's node_info): its
        inputs with their specs, the input order and the outputs. KeyError for a type ComfyUI does not have."""
        from comfy_api.internal import _ComfyNodeInternal

        cls = self.node_classes[class_type]
        if issubclass(cls, _ComfyNodeInternal):
            return cls.GET_NODE_INFO_V1()
        inputs = cls.INPUT_TYPES()
        outputs = list(cls.RETURN_TYPES)
        return {
            "input": inputs,
            "input_order": {key: list(value) for key, value in inputs.items()},
            "output": outputs,
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or outputs),
        }

    def pack_module(self, name: str) -> Any:
        """A module of the pack as ComfyUI's custom-node loader imported it, by its path in the pack, e.g.
        ``"nodes.model_family"`` or ``"samplers.schedules"`` (not ``flowdps.*``, a second copy)."""
        module = self.node_classes["FlowDPSRestore"].__module__    # <the pack's module name>.nodes.<...>
        return sys.modules[f"{module[:module.index('.nodes.')]}.{name}"]

    def pack_node_ids(self) -> list[str]:
        """Ids of the nodes that ComfyUI registered from our pack."""
        return sorted(
            k for k, cls in self._nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(cls, "RELATIVE_PYTHON_MODULE", "") == f"custom_nodes.{PACK_FOLDER}"
        )

    def _new_executor(self) -> Any:
        kw: dict[str, Any] = {}
        params = inspect.signature(self._execution.PromptExecutor.__init__).parameters
        if "cache_args" in params:  # 0.3.75 reads cache_args["ram"] unconditionally
            kw["cache_args"] = {"lru": 0, "ram": 0}
        return self._execution.PromptExecutor(self._server, cache_type=self._execution.CacheType.CLASSIC, **kw)

    def run(self, prompt: dict, *, fresh: bool = False) -> GraphResult:
        """Validate and execute an API-format prompt; never raises for a node failure (see ``GraphResult``).

        ``fresh=True`` uses a new executor, so no node output is reused from an earlier graph (the
        shared executor caches like a running server does).
        """
        execution = self._execution
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        ok, err, outputs, node_errors = valid[:4]
        if not ok:
            raise GraphValidationError(f"{err.get('message')}: {err.get('details')}; node errors: {node_errors}")
        executor = self._new_executor() if fresh else self._executor
        self._server.messages = []
        executor.execute(prompt, prompt_id, {"client_id": None}, outputs)
        result = GraphResult(prompt_id=prompt_id, success=bool(executor.success), output_dir=self.output_dir,
                             messages=list(executor.status_messages))
        for node_id in prompt:
            entry = executor.caches.outputs.get(node_id)
            if entry is None:
                continue
            outs = entry.outputs if hasattr(entry, "outputs") else entry
            ui = entry.ui if hasattr(entry, "ui") else None
            result.outputs[node_id] = outs
            if ui:
                result.ui[node_id] = ui.get("output", ui) if "meta" in ui else ui
        for event, data in executor.status_messages:
            if event in ("execution_error", "execution_interrupted"):
                result.error = GraphError(
                    node_id=data.get("node_id"),
                    node_type=data.get("node_type"),
                    exception_type=data.get("exception_type", "InterruptProcessingException"),
                    message=data.get("exception_message", "interrupted"),
                    traceback="".join(data.get("traceback", [])),
                )
        return result


_SESSION: ComfySession | None = None


def node_info(class_type: str) -> dict[str, Any]:
    """``class_type``'s ``/object_info`` entry (:meth:`ComfySession.node_info`) from the ComfyUI that
    :func:`start` loaded in this process; RuntimeError before it has."""
    if _SESSION is None:
        raise RuntimeError("no ComfyUI in this process yet: call flowdps_dev.comfy_env.start() first")
    return _SESSION.node_info(class_type)


def start(
    comfy_path: str | os.PathLike | None = None,
    *,
    models_dir: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    cpu: bool | None = None,
) -> ComfySession:
    """Import ComfyUI in this process with only our pack as custom node; idempotent.

    ``models_dir`` (default ``$FLOWDPS_MODELS``) is added to the model search paths (its sub-folders
    ``diffusion_models``, ``vae``, ``text_encoders``, ``checkpoints``); ``work_dir`` (default: a new
    temporary folder) holds ComfyUI's input, output and temp folders. Raises :class:`ComfyNotFoundError`
    without a ComfyUI tree and ``RuntimeError`` when the pack fails to load.
    """
    global _SESSION
    if _SESSION is not None:
        return _SESSION
    comfy = add_comfy_to_path(comfy_path, cpu=cpu)
    link = comfy / "custom_nodes" / PACK_FOLDER
    if not (link / "__init__.py").is_file():
        raise ComfyNotFoundError(f"{link} is missing: run `make setup` to link the pack into ComfyUI")

    from comfy.cli_args import args

    args.disable_all_custom_nodes = True
    args.whitelist_custom_nodes = [PACK_FOLDER]
    import folder_paths
    import utils.extra_config  # noqa: F401  (must precede nodes: see the module docstring)

    models = Path(models_dir or os.environ.get("FLOWDPS_MODELS", "")) if (models_dir or os.environ.get("FLOWDPS_MODELS")) else None
    if models is not None:
        for kind in MODEL_KINDS:
            folder_paths.add_model_folder_path(kind, str(models / kind), is_default=True)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="flowdps-comfy-"))
    for sub, setter in (("output", folder_paths.set_output_directory), ("input", folder_paths.set_input_directory),
                        ("temp", folder_paths.set_temp_directory)):
        (work / sub).mkdir(parents=True, exist_ok=True)
        setter(str(work / sub))

    handler = _RecordingHandler()
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    try:
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        root_logger.removeHandler(handler)
    session = ComfySession(comfy, models, work, handler.records)
    if not session.pack_node_ids():
        failures = [r for r in handler.records if PACK_FOLDER in r or "comfy_entrypoint" in r]
        raise RuntimeError("ComfyUI did not register any node of the pack:\n" + "\n".join(failures or handler.records[-20:]))
    _SESSION = session
    return session

