"""The package's layers: each module imports only from its own layer or those below it, so a reader can take the
package from the bottom up (README, "Layout")."""

import ast
from pathlib import Path

import prefmodule

ROOT = Path(prefmodule.__file__).parent
# top to bottom; a module of a layer may import from its own layer and those after it
LAYERS = [{"cli", "__main__", "__init__"}, {"objectives"}, {"sampling"}, {"training"}, {"outputs"},
          {"data", "reference"}, {"models"}, {"errors", "paths", "cache", "progress", "private"}]


def rank(module: str) -> int:
    """The layer of ``prefmodule.<part>...`` (or of the package itself), 0 at the top."""
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def imported(path: Path) -> list[str]:
    """The prefmodule modules ``path`` imports (``from prefmodule import X`` counts as ``prefmodule.X``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "prefmodule":
            names += [f"prefmodule.{a.name}" for a in node.names] if node.module == "prefmodule" else [node.module]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "prefmodule"]
    return names


def test_every_layer_of_the_layout_holds_what_the_package_has():
    parts = {path.stem if path.parent == ROOT else path.relative_to(ROOT).parts[0] for path in ROOT.rglob("*.py")}
    assert parts == set().union(*LAYERS)  # a new top-level module or folder takes its place here


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        own = "prefmodule." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        upward += [f"{path.relative_to(ROOT.parent)} imports {name}" for name in imported(path)
                   if rank(name) < rank(own)]
    assert upward == []
