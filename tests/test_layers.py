"""The layering the architecture promises, checked on the source: arrows point only down the table of
docs/architecture.md (api ← algos, runtime, engines, workflows, tasks ← recipes)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rollflow"


def imports(package: str) -> dict[str, set[str]]:
    """Every module a package's files import (absolute names), by file."""
    out = {}
    for path in sorted((SRC / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(SRC))] = names
    return out


def offending(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{file} imports {name}" for file, names in imports(package).items() for name in sorted(names)
            if name.split(".")[0] in forbidden or name.startswith(tuple(f + "." for f in forbidden)) or name in forbidden]


@pytest.mark.parametrize("package, forbidden", [
    # no RL maths, no tokenizer, no model library in the runtime: recipes hand it step functions and workflows
    ("runtime", ("rollflow.algos", "rollflow.engines", "rollflow.workflows", "rollflow.recipes", "rollflow.tasks",
                 "transformers", "tokenizers")),
    ("api", ("rollflow.algos", "rollflow.runtime", "rollflow.engines", "rollflow.workflows", "rollflow.recipes",
             "rollflow.tasks", "rollflow.config", "transformers", "ray")),
    ("algos", ("rollflow.runtime", "rollflow.engines", "rollflow.workflows", "rollflow.recipes", "transformers", "ray")),
    ("engines", ("rollflow.runtime", "rollflow.algos", "rollflow.workflows", "rollflow.recipes", "ray")),
    ("workflows", ("rollflow.runtime", "rollflow.algos", "rollflow.engines", "rollflow.recipes", "ray")),
])
def test_arrows_point_down(package, forbidden):
    assert offending(package, forbidden) == []


def test_only_the_ray_backend_imports_ray():
    files = [file for file, names in imports("runtime").items() if any(n == "ray" or n.startswith("ray.") for n in names)]
    assert files == ["runtime/ray_backend.py"]
