"""The pack's packaging contract, checked without ComfyUI: cheap import, V3-only registration,
pyproject metadata, and the import boundary that keeps operators/ and samplers/ ComfyUI-free."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACK_DIRS = ("nodes", "operators", "samplers")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_root_import_is_cheap_and_side_effect_free(tmp_path):
    # Import the root __init__ the way ComfyUI does (spec_from_file_location on the folder) in a clean
    # interpreter, and check that nothing heavy was imported and nothing was registered or printed.
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("pack_under_test", {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        m = importlib.util.module_from_spec(spec); sys.modules["pack_under_test"] = m; spec.loader.exec_module(m)
        heavy = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "comfy", "comfy_api", "numpy", "nodes"))
        print(json.dumps({{"heavy": heavy, "attrs": sorted(vars(m)), "sub": sorted(k for k in sys.modules if k.startswith("pack_under_test."))}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["sub"] == [], "importing the pack must not import its sub-packages"
    assert "comfy_entrypoint" in report["attrs"]
    assert "NODE_CLASS_MAPPINGS" not in report["attrs"], "V1 mappings would make ComfyUI ignore comfy_entrypoint"
    assert out.stderr == ""


def test_version_matches_pyproject():
    import flowdps

    assert flowdps.__version__ == pyproject()["project"]["version"]


def test_pyproject_metadata():
    meta = pyproject()
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert project["name"] == "comfyui-flowdps"
    assert project["license"] == {"text": "GPL-3.0-or-later"}
    assert project["requires-python"] == ">=3.10"
    deps = [d.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for d in project["dependencies"]]
    assert not {"torch", "torchvision", "torchaudio"} & set(deps), "never list torch: pip would replace a CUDA build"
    assert {"pytest", "hypothesis", "ruff", "mypy", "diffusers"} <= set(project["optional-dependencies"]["test"])
    assert comfy["PublisherId"]
    assert comfy["DisplayName"]
    assert "includes" in comfy
    assert comfy["requires-comfyui"].startswith(">=")
    markers = {m.split(":")[0] for m in meta["tool"]["pytest"]["ini_options"]["markers"]}
    assert {"comfy", "browser", "slow"} <= markers


def test_registry_icon_is_a_small_picture_of_this_repository():
    """[tool.comfy] Icon is the raw URL of a small square picture that the repository itself holds."""
    meta = pyproject()
    repo = meta["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    icon = meta["tool"]["comfy"]["Icon"]
    assert icon.startswith(prefix), icon
    path = ROOT / icon.removeprefix(prefix)
    assert path.is_file(), path
    assert path.stat().st_size < 100_000
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == height
    assert 128 <= width <= 512


def test_publish_workflow_runs_on_main_when_pyproject_changes_and_not_in_ci():
    text = (ROOT / ".github" / "workflows" / "publish.yml").read_text()
    assert "Comfy-Org/publish-node-action@v1" in text
    assert "secrets.REGISTRY_ACCESS_TOKEN" in text
    on = text[text.index("\non:"):text.index("\njobs:")]
    assert "- main" in on
    assert '- "pyproject.toml"' in on
    assert "pull_request" not in on
    assert "publish" not in (ROOT / ".ci" / "run").read_text().lower()


def _package_key(name: str) -> str:
    """A requirement's name as pip compares it (PEP 503: case and runs of -_. do not matter)."""
    return "-".join(name.lower().replace("_", "-").replace(".", "-").split("-"))


def test_lint_type_checks_the_pure_layers_with_pinned_tools():
    """`make lint` (run by `make test`) runs mypy in strict mode over operators/ and samplers/ after ruff; the
    set-up installs the test extra from pyproject.toml under flowdps_dev/constraints.txt, which pins each of its
    tools exactly."""
    meta = pyproject()
    mypy = meta["tool"]["mypy"]
    assert mypy["files"] == ["operators", "samplers"]
    assert mypy["strict"] is True
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check ." in recipe
    assert "bin/mypy" in recipe
    assert "lint" in makefile.split("\ntest:", 1)[1].split("\n", 1)[0]
    pins = {_package_key(line.split("==")[0]) for line in (ROOT / "flowdps_dev" / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    test_extra = {_package_key(name) for name in meta["project"]["optional-dependencies"]["test"]}
    assert test_extra <= pins, f"no exact pin for {sorted(test_extra - pins)}"
    assert {"mypy", "mypy-extensions", "pathspec", "librt", "ast-serialize"} <= pins   # mypy's own requirements
    setup = (ROOT / "flowdps_dev" / "setup.sh").read_text()
    assert '["optional-dependencies"]["test"]' in setup, "the set-up reads the test extra from pyproject.toml"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node that can execute at run time: the body of ``if TYPE_CHECKING:`` is skipped (its ``else`` is not)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack += [node.test, *node.orelse]
        else:
            stack += list(ast.iter_child_nodes(node))


def _absolute_imports(path: Path) -> list[str]:
    """Absolute imports that run when the module is imported (type-checking-only imports never execute)."""
    names = []
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_import_scan_sees_runtime_imports_and_skips_type_checking_only_ones(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import os\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from operators import Blur\nelse:\n    from samplers import x\n"
        "def f():\n    import nodes\n    if typing.TYPE_CHECKING:\n        import flowdps\n")
    assert sorted(_absolute_imports(src)) == ["nodes", "os", "samplers", "typing"]


@pytest.mark.parametrize("package", PACK_DIRS)
def test_pack_imports_its_own_modules_relatively(package):
    own = {"nodes", "operators", "samplers", "flowdps", "flowdps_dev"}
    offenders = {
        str(p.relative_to(ROOT)): name
        for p in (ROOT / package).rglob("*.py")
        for name in _absolute_imports(p)
        if name.split(".")[0] in own
    }
    assert offenders == {}


@pytest.mark.parametrize("package", ["operators", "samplers"])
def test_pure_layers_never_import_comfyui(package):
    comfy_modules = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes",
                     "server", "execution", "latent_preview", "node_helpers"}
    offenders = {
        str(p.relative_to(ROOT)): name
        for p in (ROOT / package).rglob("*.py")
        for name in _absolute_imports(p)
        if name.split(".")[0] in comfy_modules
    }
    assert offenders == {}


RUFF = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")


@pytest.mark.skipif(not Path(RUFF).exists(), reason="ruff not installed")
@pytest.mark.parametrize(
    ("folder", "source", "banned"),
    [
        ("operators", "import comfy.model_management\n", True),
        ("samplers", "from comfy_api.latest import io\n", True),
        ("samplers", "import folder_paths\n", True),
        ("operators", "from samplers import flow\n", True),
        ("nodes", "import comfy.model_management\n", False),
        ("nodes", "from comfy_api.latest import io\n", False),
    ],
)
def test_ruff_enforces_the_import_boundary(tmp_path, folder, source, banned):
    # Lint a probe file placed inside the real package folder with the project's own configuration.
    probe = ROOT / folder / f"_ruff_probe_{tmp_path.name}.py"
    probe.write_text(source)
    try:
        out = subprocess.run([RUFF, "check", "--no-cache", "--select", "TID251", "--output-format", "concise",
                              str(probe)], capture_output=True, text=True, cwd=ROOT)
    finally:
        probe.unlink()
    assert ("TID251" in out.stdout) is banned, out.stdout + out.stderr
