"""Turn a shipped restoration workflow (UI format) into the evaluation prompt for one ground-truth image.

The shipped workflows restore a measurement loaded with ``LoadImage``. For the protocol the runner uploads
the *clean* image instead and inserts ``FlowDPSSimulateMeasurement`` (the pack's own operator, the paper's
noise level, seed 0) between it and everything that read the measurement, so the measurement is simulated
on the server by the same operator the restoration uses. Only the restoration's ``SaveImage`` and what it
needs are kept (previews are dropped). The UI -> API conversion uses the server's ``/object_info``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowdps_dev.workflow_convert import ui_to_api

from .protocol import Protocol

RESTORE_NODES = ("FlowDPSRestore", "AFDPSRestore")
SIMULATE_NODE = "FlowDPSSimulateMeasurement"
SIMULATE_ID = "flowdps_eval_measurement"
TASK_NAMES = {  # operator node -> task label of the paper's tables ({factor} from the node's inputs)
    "FlowDPSOperatorSRBicubic": "SR x{factor} bicubic",
    "FlowDPSOperatorSRAvgPool": "SR x{factor} avg-pool",
    "FlowDPSOperatorGaussianBlur": "Gaussian deblur",
    "FlowDPSOperatorPaperGaussianBlur": "Gaussian deblur",
    "FlowDPSOperatorMotionBlur": "motion deblur",
    "FlowDPSOperatorKernelBlur": "deblur (custom kernel)",
    "FlowDPSOperatorBoxInpaint": "box inpainting",
    "FlowDPSOperatorRandomInpaint": "random inpainting",
    "FlowDPSOperatorMaskInpaint": "mask inpainting",
}


class WorkflowError(ValueError):
    """The workflow does not have the shape the evaluation needs (one restore node fed by a LoadImage)."""


@dataclass(frozen=True)
class EvalGraph:
    """Node ids of the evaluation prompt and the labels of its table row."""

    restore: str
    load: str
    loader: str
    save: str
    task: str
    method: str


def load_ui_workflow(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workflow {str(path)!r} does not exist")
    return json.loads(path.read_text(encoding="utf-8"))


def _links_to(node: Mapping[str, Any], source: str) -> list[str]:
    return [k for k, v in node["inputs"].items() if isinstance(v, list) and len(v) == 2 and v[0] == source]


def _single(prompt: Mapping[str, dict], types: Iterable[str], what: str) -> str:
    types = tuple(types)
    ids = [k for k, v in prompt.items() if v["class_type"] in types]
    if len(ids) != 1:
        raise WorkflowError(f"the workflow must contain exactly one {what} ({' or '.join(types)}), it has {len(ids)}")
    return ids[0]


def subgraph(prompt: Mapping[str, dict], roots: Iterable[str]) -> dict:
    """``roots`` and every node they depend on (ids and inputs unchanged)."""
    keep, todo = set(), list(roots)
    while todo:
        node_id = todo.pop()
        if node_id not in keep:
            keep.add(node_id)
            todo += [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return {k: v for k, v in prompt.items() if k in keep}


def to_api(workflow: Mapping[str, Any], object_info: Mapping[str, dict]) -> dict:
    """UI workflow -> API prompt with the server's node schemas (clear error for a node it does not have)."""

    def node_info(class_type: str) -> dict:
        if class_type not in object_info:
            raise WorkflowError(f"the server has no node type {class_type!r} (is the comfyui-flowdps pack installed?)")
        return object_info[class_type]

    return ui_to_api(workflow, node_info)


def evaluation_prompt(api: Mapping[str, dict], *, checkpoint: str, image_name: str, protocol: Protocol,
                      prefix: str) -> tuple[dict, EvalGraph]:
    """The API prompt restoring a measurement simulated from the uploaded clean image ``image_name``.

    api: the workflow as an API prompt (:func:`to_api`); checkpoint: the name ``CheckpointLoaderSimple``
    lists on the server; prefix: the SaveImage filename prefix (unique per image and run).
    """
    prompt = copy.deepcopy(dict(api))
    restore = _single(prompt, RESTORE_NODES, "restore node")
    inputs = prompt[restore]["inputs"]
    source = inputs.get("measurement")
    if not (isinstance(source, list) and prompt.get(source[0], {}).get("class_type") == "LoadImage"):
        raise WorkflowError("the restore node's measurement must come from a LoadImage node")
    load = source[0]
    loader = _single(prompt, ("CheckpointLoaderSimple",), "checkpoint loader")
    saves = [k for k, v in prompt.items() if v["class_type"] == "SaveImage" and _links_to(v, restore)]
    if len(saves) != 1:
        raise WorkflowError(f"the restore node's output must go to exactly one SaveImage, it goes to {len(saves)}")
    save = saves[0]
    for node in prompt.values():  # everything that read the measurement now reads the simulated one
        for key in _links_to(node, load):
            if node["inputs"][key][1] == 0:
                node["inputs"][key] = [SIMULATE_ID, 0]
    prompt[SIMULATE_ID] = {"class_type": SIMULATE_NODE,
                           "inputs": {"image": [load, 0], "operator": inputs["operator"],
                                      "sigma_y": protocol.sigma_y, "seed": protocol.seed,
                                      "clip": False}}   # y = A x + noise exactly, as the paper simulates it
    prompt[load]["inputs"]["image"] = image_name
    prompt[loader]["inputs"]["ckpt_name"] = checkpoint
    settings = {"seed": protocol.seed, "steps": protocol.steps, "cfg": protocol.cfg, "shift": protocol.shift,
                "sigma_y": protocol.sigma_y}
    inputs.update({k: v for k, v in settings.items() if k in inputs})
    prompt[save]["inputs"]["filename_prefix"] = prefix
    prompt = subgraph(prompt, [save])
    op_source = inputs["operator"]
    operator = prompt[op_source[0]] if isinstance(op_source, list) else {"class_type": "?", "inputs": {}}
    label = TASK_NAMES.get(operator["class_type"], operator["class_type"])
    task = label.format(factor=operator["inputs"].get("factor", "?"))
    klass = prompt[restore]["class_type"]
    method = "AFDPS" if klass == "AFDPSRestore" else str(inputs.get("method", "flowdps")).replace(
        "flowdps", "FlowDPS").replace("flowchef", "FlowChef")
    return prompt, EvalGraph(restore=restore, load=load, loader=loader, save=save, task=task, method=method)


def checkpoint_names(object_info: Mapping[str, dict]) -> list[str]:
    """The checkpoint names ``CheckpointLoaderSimple`` offers on a server (its COMBO options)."""
    spec = object_info.get("CheckpointLoaderSimple", {}).get("input", {}).get("required", {}).get("ckpt_name")
    if not spec:
        return []
    options = spec[0]
    if isinstance(options, str) and len(spec) > 1:  # newer COMBO format: ["COMBO", {"options": [...]}]
        options = spec[1].get("options", [])
    return list(options) if isinstance(options, list | tuple) else []
