"""The import rule: the answer path loads neither Lightning nor the training modules, and no two modules import each
other (DESIGN.md). Imports are checked in a fresh interpreter (what loads) and in the source (lazy imports too)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medassist"
TRAINING = {"medassist.data", "medassist.dataprep", "medassist.model", "medassist.cli", "medassist.evaluate",
            "medassist.loss", "medassist.callbacks", "medassist.index"}
ANSWER_SIDE = ["medassist.prompts", "medassist.records", "medassist.retrieval", "medassist.sampling", "medassist.safety",
               "medassist.openai_api", "medassist.generate", "medassist.batching", "medassist.jobs",
               "medassist.upstream", "medassist.raw", "medassist.serve", "medassist.ask", "medassist.commands"]
TORCH_FREE = {"medassist.prompts", "medassist.records", "medassist.retrieval", "medassist.sampling", "medassist.safety",
              "medassist.openai_api", "medassist.ask", "medassist.commands"}


def loaded_after_import(module: str) -> list[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("module", ANSWER_SIDE)
def test_answer_side_module_loads_no_lightning_and_no_training_module(module):
    loaded = set(loaded_after_import(module))
    assert not {m for m in loaded if m == "lightning" or m.startswith(("lightning.", "pytorch_lightning"))}
    assert not loaded & TRAINING, sorted(loaded & TRAINING)
    if module in TORCH_FREE:
        assert "torch" not in loaded


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The medassist modules `path` imports anywhere in its source (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from medassist.safety import guidance` imports the module medassist.safety.guidance
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def test_no_two_modules_import_each_other():
    graph = import_graph()
    pairs = {tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())}
    assert not pairs, f"modules that import each other: {sorted(pairs)}"


def test_answer_side_never_imports_the_training_side_even_lazily():
    graph = import_graph()
    for start in set(ANSWER_SIDE) - {"medassist.commands"}:  # the entry point runs both sides, each only when asked
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += graph.get(name, ())
        assert not seen & TRAINING, (start, sorted(seen & TRAINING))
