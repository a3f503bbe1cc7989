"""No network access, no unpickling and no dynamic code in the pack's own code paths (issue: hardening §6).

The pack runs inside the artist's ComfyUI process: it must never fetch anything, never load a pickle (a
pickle runs code) and never evaluate strings. The scan reads every module of the shipped layers with ``ast``
(imports, attribute calls, keyword arguments), so a comment or a docstring that mentions a name does not
count, and an alias (``import pickle as p``) does not escape it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("__init__.py", "operators", "samplers", "nodes")  # what a user's ComfyUI imports

FORBIDDEN_MODULES = {
    "pickle": "unpickling runs code", "cPickle": "unpickling runs code", "dill": "unpickling runs code",
    "marshal": "loads code objects", "shelve": "pickles", "joblib": "pickles",
    "socket": "network", "urllib": "network", "http": "network", "requests": "network", "aiohttp": "network",
    "httpx": "network", "ftplib": "network", "smtplib": "network", "huggingface_hub": "downloads models",
    "subprocess": "runs programs", "ctypes": "native code",
}
FORBIDDEN_CALLS = {
    "torch.load": "unpickles (use safetensors)", "torch.hub": "downloads", "eval": "evaluates strings",
    "exec": "evaluates strings", "compile": "compiles strings", "__import__": "dynamic import",
    "os.system": "runs programs", "os.popen": "runs programs",
}


def dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def violations(source: str, name: str = "<string>") -> list[str]:
    """Every forbidden import, call or ``allow_pickle=True`` in ``source``, as 'name:line: what (why)'."""
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        for module in modules:
            top = module.split(".")[0]
            if top in FORBIDDEN_MODULES:
                found.append(f"{name}:{node.lineno}: import {module} ({FORBIDDEN_MODULES[top]})")
        if isinstance(node, ast.Call):
            called = dotted(node.func)
            for bad, why in FORBIDDEN_CALLS.items():
                if called == bad or called.startswith(bad + "."):
                    found.append(f"{name}:{node.lineno}: {called}() ({why})")
            for keyword in node.keywords:
                if keyword.arg == "allow_pickle" and not (
                        isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                    found.append(f"{name}:{node.lineno}: allow_pickle ({FORBIDDEN_MODULES['pickle']})")
    return found


def shipped_files() -> list[Path]:
    files = []
    for entry in SHIPPED:
        path = ROOT / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def test_the_shipped_code_has_no_network_pickle_or_dynamic_code():
    files = shipped_files()
    assert len(files) > 20
    found = [v for path in files for v in violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert found == []


@pytest.mark.parametrize(("snippet", "expected"), [
    ("import pickle as p\np.loads(b'')", "import pickle"),
    ("from urllib.request import urlopen", "import urllib.request"),
    ("import torch\ntorch.load('k.pt')", "torch.load()"),
    ("import torch\ntorch.hub.load_state_dict_from_url('x')", "torch.hub.load_state_dict_from_url()"),
    ("import numpy as np\nnp.load('a.npy', allow_pickle=True)", "allow_pickle"),
    ("eval('1 + 1')", "eval()"),
    ("import requests", "import requests"),
])
def test_the_scan_catches_each_kind(snippet, expected):
    found = violations(snippet)
    assert len(found) == 1
    assert expected in found[0]


def test_the_scan_ignores_names_in_strings_and_safe_calls():
    clean = '"""torch.load and pickle are never used."""\nimport numpy as np\nnp.load("a.npy", allow_pickle=False)\n'
    assert violations(clean) == []
