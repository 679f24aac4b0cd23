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
    {"train", "evaluate", "generate", "analyze", "flops", "hf", "serve"},
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


# ---------------------------------------------------------------------------------------------------------------
# Size limits and import circles (the working rules: no file over 450 lines, no function over 80, no circle)

ROOT = PKG.parents[1]
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def source_files() -> list[Path]:
    """Every Python file of src/, benchmarks/ and tests/, and the compiled kernels' C++ sources."""
    files = [p for d in ("src", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")]
    csrc = PKG / "ops" / "csrc"
    return sorted(files + list(csrc.glob("*.h")) + list(csrc.glob("*.cpp")))


def test_no_source_file_over_the_line_limit():
    files = source_files()
    assert any(p.suffix == ".cpp" for p in files) and any(p.parent.name == "benchmarks" for p in files)
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in files
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES]
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by responsibility):\n" + "\n".join(long)


def long_functions(path: Path, root: Path = ROOT) -> list[str]:
    """'file:line name (n lines)' for each function or method of `path` longer than MAX_FUNCTION_LINES, counted
    from its `def` line to its last line (nested functions count in their parent too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_long_functions_are_found(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "probe.py"
    path.write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n", encoding="utf-8")
    assert long_functions(path, tmp_path) == [f"probe.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]


def test_no_function_over_the_line_limit():
    long = [f for p in source_files() if p.suffix == ".py" for f in long_functions(p)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split out named steps):\n" + "\n".join(long)


def _runtime_imports(tree: ast.AST):
    """The Import / ImportFrom nodes of a module, lazy ones inside functions included, except those under
    `if TYPE_CHECKING:` (annotations only; never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, Path], package: str | None) -> dict[str, set[str]]:
    """{module: the modules of `modules` it imports}. `from a import b` is an import of `a.b` where that is a
    module, else of `a`; relative imports are resolved inside `package` (None: flat scripts)."""
    graph = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level and package is not None:
                    parts = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # a.b.c where only a.b is a module of ours
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    found = circles(import_graph(package_modules(), "memoryformer"))
    assert not found, "import circles (move the shared part into a module both import):\n" + \
        "\n".join(" <-> ".join(c) for c in found)


def test_no_import_circle_in_the_benchmarks():
    modules = {p.stem: p for p in (ROOT / "benchmarks").glob("*.py")}
    graph = import_graph(modules, None)
    assert graph["block"] >= {"kernel_timing"}  # the scripts import each other by file name
    found = circles(graph)
    assert not found, "import circles among benchmarks/ (move the shared part into a module both import):\n" + \
        "\n".join(" <-> ".join(c) for c in found)
