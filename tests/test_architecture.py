"""The import rule: contract floor < independent stages < pipeline < faces, read from the source with `ast`
(imports inside functions included), and the README's architecture section names the tree's folders."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"starcast": ROOT / "starcast", "starcast.exporter": ROOT / "exporter", "starcast.graphs": ROOT / "graphs",
           "starcast.runtime": ROOT / "runtime"}  # fmt: skip
STAGES = ("exporter", "graphs", "runtime")
ALLOWED = {
    "contract": {"contract"},
    "exporter": {"contract", "exporter"},
    "graphs": {"contract", "graphs"},
    "runtime": {"contract", "runtime"},
    "pipeline": {"contract", *STAGES, "pipeline"},
    "face": {"contract", *STAGES, "pipeline", "face"},
}


def layer(module: str) -> str | None:
    """The layer of a starcast module; None for the package root (it holds only the version)."""
    parts = module.split(".")
    if parts[0] != "starcast":
        return "external"
    if len(parts) == 1:
        return None
    if parts[1] in ("contract", "pipeline", *STAGES):
        return parts[1]
    return "face"


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names if node.module == "starcast")
    return {name for name in names if name.split(".")[0] == "starcast"}


def test_every_layer_imports_only_the_layers_below_it():
    found = modules()
    assert {"starcast.contract.manifest", "starcast.runtime.generator", "starcast.pipeline.export"} <= set(found)
    violations = []
    for module, path in sorted(found.items()):
        own = layer(module) or "face"  # the package root lazily offers Generator and export
        for imported in sorted(imports(path)):
            target = layer(imported)
            if target is not None and target not in ALLOWED[own]:
                violations.append(f"{module} ({own}) imports {imported} ({target})")
    assert not violations, "\n".join(violations)


def test_the_rule_catches_a_lazy_cross_stage_import(tmp_path):
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    from starcast.exporter.model import GPTBigCode\n    return GPTBigCode\n")
    assert "starcast.exporter.model" in imports(sneaky)
    assert layer("starcast.exporter.model") not in ALLOWED["runtime"]


def test_the_runtime_imports_no_pytorch_and_no_graph_passes():
    heavy = {"torch", "onnxscript", "onnx_ir", "safetensors", "transformers"}
    for module, path in modules().items():
        if layer(module) not in ("runtime", "contract"):
            continue
        tree = ast.parse(path.read_text())
        roots = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        roots |= {
            node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not roots & heavy, f"{module} imports {roots & heavy}"


def test_readme_architecture_section_names_the_folders():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    for folder in ("starcast/contract/", "exporter/", "graphs/", "runtime/", "starcast/pipeline/", "starcast/cli/"):
        assert folder in section, folder
        assert (ROOT / folder).is_dir(), folder
