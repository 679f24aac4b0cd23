"""The documentation names only what exists: every dotted memoryformer name in backticks in docs/*.md imports and
resolves, every backticked source file is in the tree, and every relative link points at a committed file."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "memoryformer"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# the package's own top-level modules and packages: `train.loop.train_step` means memoryformer.train.loop.train_step
TOP = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"} | {p.name for p in PKG.iterdir()
                                                                   if (p / "__init__.py").is_file()}
FILE_SUFFIXES = {"py", "cpp", "h", "md", "json", "jsonl", "yaml", "yml", "txt", "safetensors", "xz", "gz", "png",
                 "pt", "fixed"}
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def names_in(text: str) -> set[str]:
    """Dotted memoryformer names in backticks: a whole span such as `train.loop.train_step` or `mf.load` whose
    first part is one of the package's modules, and any `memoryformer.x.y` / `mf.x` inside a longer span (a
    command, a call)."""
    found = set()
    for span in SPAN.findall(text):
        span = span.strip()
        if DOTTED.fullmatch(span):
            first, last = span.split(".")[0], span.rsplit(".", 1)[1]
            if (first in TOP or first in ("memoryformer", "mf")) and last not in FILE_SUFFIXES:
                found.add(span)
        for m in re.finditer(r"(?<![\w./-])(?:memoryformer|mf)(?:\.[A-Za-z_]\w*)+", span):
            if m.group(0).rsplit(".", 1)[1] not in FILE_SUFFIXES:
                found.add(m.group(0))
    return found


def defined_names(module) -> set[str]:
    """Names a module defines at its top level (def, class, assignment), not those it imports."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return out


def resolve(name: str):
    """The object `name` denotes (module path imported, then attributes); raises when it does not exist, or when
    a plain module (not a package, whose `__init__` is a public face) only imports the name from elsewhere, so the
    doc names where a thing lives. pytest.skip when a module needs an optional dependency that is not installed."""
    parts = name.split(".")
    if parts[0] == "mf":
        parts[0] = "memoryformer"
    elif parts[0] != "memoryformer":
        parts = ["memoryformer", *parts]
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("memoryformer"):
                pytest.skip(f"{name}: needs {e.name}")
            continue
        if i < len(parts) and not hasattr(obj, "__path__") and parts[i] not in defined_names(obj):
            where = getattr(getattr(obj, parts[i], None), "__module__", None)
            raise AttributeError(f"{module} does not define {parts[i]}" + (f" (it lives in {where})" if where else ""))
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_names_are_found():
    text = ("`train.loop.train_step` and `mf.load`, `python -m memoryformer.evaluate.sources DIR`, "
            "`config.py`, `model.safetensors`, `torch.compile`, `x.y`")
    assert names_in(text) == {"train.loop.train_step", "mf.load", "memoryformer.evaluate.sources"}
    assert resolve("train.loop.train_step").__name__ == "train_step"
    with pytest.raises(AttributeError):
        resolve("train.loop.no_such_name")
    with pytest.raises(AttributeError, match="does not define"):
        resolve("train.loop.MemoryFormerError")  # imported there from config, not defined


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_dotted_names_exist(doc):
    missing = []
    for name in sorted(names_in(doc.read_text(encoding="utf-8"))):
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"`{name}` ({type(e).__name__}: {e})")
    assert not missing, f"{doc.relative_to(ROOT)} names what does not exist:\n" + "\n".join(missing)


def _tree_files() -> list[str]:
    return [p.relative_to(ROOT).as_posix() for d in ("src", "benchmarks", "tests", "docs", "configs", ".ci")
            if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*") if p.is_file()]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_source_files_named_exist(doc):
    """A backticked `path/file.py` (or .cpp, .h) is a file of the tree: its path, or the end of one (a file named
    inside its folder's row, `ops/csrc/engine.cpp`, `reference.py`)."""
    files = _tree_files()
    missing = [span for span in SPAN.findall(doc.read_text(encoding="utf-8"))
               if re.fullmatch(r"[\w./-]+\.(py|cpp|h)", span)
               and not any(f == span or f.endswith("/" + span) for f in files)]
    assert not missing, f"{doc.relative_to(ROOT)} names files that are not in the tree: {missing}"


@pytest.mark.parametrize("doc", [*DOCS, ROOT / "README.md"], ids=lambda p: p.name)
def test_relative_links_point_at_files(doc):
    missing = [target for target in LINK.findall(doc.read_text(encoding="utf-8"))
               if "://" not in target and not target.startswith("mailto:")
               and not (doc.parent / target).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to files that do not exist: {missing}"


UNIT = r"(?:tokens/s|tok/s|[kMGT]?B|GiB|MiB|ms|µs|s|min|h|x|×|%|[kMBG])"
FIGURE = re.compile(r"(?<![\w.$=/-])(\d[\d,]*\.\d+|\d{1,3}(?:,\d{3})+|\d+)(?:\s?" + UNIT + r")(?![\w/])")


def figures_in(text: str) -> set[str]:
    """Numbers with a unit ("176.3 tokens/s", "2.84x", "+0.066 %", "1,551 tokens/s") in the prose of a markdown file:
    code blocks and inline code (commands, flags, defaults) left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    return {m.group(1) for m in FIGURE.finditer(text)}


def test_figures_are_found():
    assert figures_in("decodes 176.3 tokens/s, 2.84x and +0.066 % (`--port 8000`); 1,551 tokens/s\n```\n9.9 s\n```") \
        == {"176.3", "2.84", "0.066", "1,551"}


def test_readme_figures_come_from_committed_results():
    """Every measured figure the README quotes is in a file under benchmarks/results/ (docs/BENCHMARKS.md links
    each to its file), so it cannot drift from what was measured."""
    results = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "benchmarks" / "results").glob("*.md"))
    missing = sorted(n for n in figures_in((ROOT / "README.md").read_text(encoding="utf-8")) if n not in results)
    assert not missing, f"README figures found in no benchmarks/results/*.md: {missing}"
