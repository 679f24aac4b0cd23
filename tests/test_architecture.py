"""The package's imports point one way: each module imports only modules of its own layer or the layers above it
(docs/ARCHITECTURE.md), lazy imports inside functions included, so there is no import circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "memoryformer"

# top to bottom, as in docs/ARCHITECTURE.md; a module may import from its own layer or any layer above
LAYERS = [
    {"config"},
    {"integrity", "resources"},
    {"ops"},
    {"layers", "attention"},
    {"model"},
    {"inference", "optim", "footprint"},
    {"data", "checkpoint"},
    {"train", "evaluate", "generate", "analyze", "flops", "hf", "lm_eval_adapter", "serve"},
    {"studies"},
    {"cli", "launch", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def top(module: str) -> str:
    """memoryformer.ops.cpu -> ops; memoryformer -> '' (the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path: Path) -> set[str]:
    rel = path.relative_to(PKG.parent).with_suffix("")
    here = ".".join(rel.parts).removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("memoryformer")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")[: len(here.split(".")) - node.level + (path.name == "__init__.py")]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("memoryformer"):
                found.add(mod)
                if mod == "memoryformer":  # from memoryformer import checkpoint, data
                    found |= {f"memoryformer.{a.name}" for a in node.names}
    return found


def test_every_module_has_a_layer():
    names = {p.relative_to(PKG).parts[0].removesuffix(".py") for p in PKG.rglob("*.py")} - {"__init__"}
    assert names <= set(RANK), f"modules with no layer in LAYERS (add them here and in docs/ARCHITECTURE.md): " \
                               f"{sorted(names - set(RANK))}"


def test_imports_point_up():
    upward = []
    for path in sorted(PKG.rglob("*.py")):
        own = path.relative_to(PKG).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for mod in imports_of(path):
            target = top(mod)
            if target in ("", "__init__") or target not in RANK:
                continue
            if RANK[target] > RANK[own]:
                upward.append(f"{path.relative_to(PKG)} imports {mod} (layer {RANK[target]} below {RANK[own]})")
    assert not upward, "\n".join(upward)


def test_import_of_the_config_stays_light():
    code = ("import sys, memoryformer.config; "
            "print(sorted(m for m in sys.modules if m.startswith('memoryformer')), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(PKG.parent), "PATH": ""}).stdout
    assert out.strip() == "['memoryformer', 'memoryformer.config'] False", out
