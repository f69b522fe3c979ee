"""The package's parts, what each owns and what each may import, read from the code itself, and docs/architecture.md
generated from them. Each part is a subpackage of qlp_compress whose docstring ends with "May import: a, b." (or
"May import: nothing else in the package."); tests/test_architecture.py enforces those rules and the other layout
rules below (among them: the benchmarks use only the package's public surface), and fails when docs/architecture.md
is stale.

    python tools/architecture.py            # rewrite docs/architecture.md
    python tools/architecture.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qlp_compress"
DOC = ROOT / "docs/architecture.md"
BENCHMARKS = ROOT / "benchmarks"
# what a benchmark (benchmarks/*.py) may import of the package: these namespaces themselves (never a submodule of
# them), base with its submodules, and nothing else. The CLI's namespace is there for the benchmarks that drive the
# command exactly as a user does (fuzz.py, exporter_matrix.py: its public app and main); the rest of the package is
# reached through qlp_compress.workflows, which re-exports the research surface the benchmarks use.
BENCHMARK_NAMESPACES = ("qlp_compress.workflows", "qlp_compress.cli")
BENCHMARK_FREE = "qlp_compress.base"  # with its submodules
MAX_LINES = 400  # no module longer than this
CLI_MAX_IMPORTS = 6  # project modules outside the CLI that the CLI may import
# third-party libraries that belong to one part each (any other part importing them breaks the layout)
LIBRARY_OWNERS = {"onnxruntime": {"deploy"}, "onnx2torch": {"importer"}, "torch_pruning": {"pruning"},
                  "typer": {"cli"}, "matplotlib": {"report"}, "ray": {"reward"}}
NO_ONNX = {"search", "data", "train"}  # parts that must not import onnx at all


@dataclass
class Module:
    name: str  # dotted, e.g. qlp_compress.deploy.engine
    part: str  # the subpackage it belongs to ("" for the package root files)
    lines: int
    imports: set[str] = field(default_factory=set)  # dotted names of qlp_compress modules it imports
    libraries: set[str] = field(default_factory=set)  # top-level third-party names
    calls: set[str] = field(default_factory=set)  # dotted attribute calls, e.g. torch.onnx.export


@dataclass
class Part:
    name: str
    summary: str
    may_import: set[str]
    modules: list[Module] = field(default_factory=list)


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def read_module(path: Path) -> Module:
    rel = path.relative_to(PACKAGE).with_suffix("")
    name = ".".join(("qlp_compress", *(p for p in rel.parts if p != "__init__")))
    part = rel.parts[0] if len(rel.parts) > 1 else ""
    text = path.read_text()
    module = Module(name, part, len(text.splitlines()))
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module.startswith("qlp_compress"):  # `from x import y`: y when it is a module, else x
                names = [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                         for a in node.names]
        elif isinstance(node, ast.Call):
            module.calls.add(_dotted(node.func))
            continue
        else:
            continue
        for n in names:
            if n.startswith("qlp_compress"):
                module.imports.add(n)
            else:
                module.libraries.add(n.split(".")[0])
    return module


def part_of(dotted: str) -> str:
    """The part a dotted qlp_compress name belongs to ("" for the root package)."""
    pieces = dotted.split(".")
    return pieces[1] if len(pieces) > 1 and (PACKAGE / pieces[1]).is_dir() else ""


def read_parts() -> dict[str, Part]:
    parts: dict[str, Part] = {}
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        rule = re.search(r"May import: ([^.]*)\.", doc)
        may = set() if rule is None or rule[1].startswith("nothing") else {p.strip() for p in rule[1].split(",")}
        summary = " ".join(doc.split("\n\n")[0].split())
        parts[init.parent.name] = Part(init.parent.name, summary, may)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = read_module(path)
        if module.part in parts:
            parts[module.part].modules.append(module)
    return parts


def violations(parts: dict[str, Part]) -> list[str]:
    """Every broken layout rule, one line each."""
    found = []
    for part in parts.values():
        if part.may_import is None:
            found.append(f"{part.name}: its docstring has no 'May import:' line")
        for m in part.modules:
            for target in sorted({part_of(i) for i in m.imports} - {part.name, ""}):
                if target not in part.may_import:
                    found.append(f"{m.name} imports {target}, which {part.name} may not import")
            if "qlp_compress.cli" in {".".join(i.split(".")[:2]) for i in m.imports} and part.name != "cli":
                found.append(f"{m.name} imports the CLI")
            for lib, owners in LIBRARY_OWNERS.items():
                if lib in m.libraries and part.name not in owners:
                    found.append(f"{m.name} imports {lib}, which belongs to {', '.join(sorted(owners))}")
            if part.name in NO_ONNX and "onnx" in m.libraries:
                found.append(f"{m.name} imports onnx; {part.name} must know nothing of ONNX")
            if "torch.onnx.export" in m.calls and m.name != "qlp_compress.deploy.export":
                found.append(f"{m.name} calls torch.onnx.export; only qlp_compress.deploy.export may")
            if m.lines > MAX_LINES:
                found.append(f"{m.name} has {m.lines} lines (at most {MAX_LINES})")
    cli_imports = {i for m in parts["cli"].modules for i in m.imports  # the root package holds only __version__
                   if not i.startswith("qlp_compress.cli") and i != "qlp_compress"}
    if len(cli_imports) > CLI_MAX_IMPORTS:
        found.append(f"the CLI imports {len(cli_imports)} project modules (at most {CLI_MAX_IMPORTS}): "
                     f"{', '.join(sorted(cli_imports))}")
    return found


def _public_names(namespace: str) -> set[str]:
    """The names a package lists in its __all__ (`__all__ = [...]` and any `__all__ += [...]`)."""
    init = PACKAGE.joinpath(*namespace.split(".")[1:], "__init__.py")
    names: set[str] = set()
    for node in ast.parse(init.read_text()).body if init.exists() else ():
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "__all__" and isinstance(node.value, ast.List | ast.Tuple):
            names |= {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    return names


def _benchmark_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every qlp_compress module a benchmark imports; a name imported from a package is the
    package itself unless it is a submodule the package does not re-export."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "qlp_compress":
                found += [(node.lineno, f"qlp_compress.{a.name}") for a in node.names]
                continue
            public = _public_names(node.module) if node.module.startswith("qlp_compress.") else set()
            found += [(node.lineno, f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}")
                       and a.name not in public else node.module) for a in node.names]
    return sorted({(line, name) for line, name in found if name.split(".")[0] == "qlp_compress"})


def benchmark_violations() -> list[str]:
    """Every import of the package in benchmarks/*.py beyond its public surface, one line each."""
    found = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        for line, name in _benchmark_imports(ast.parse(path.read_text())):
            if name not in BENCHMARK_NAMESPACES and not (name + ".").startswith(BENCHMARK_FREE + "."):
                found.append(f"benchmarks/{path.name}:{line} imports {name}; a benchmark may import only "
                             f"{', '.join(BENCHMARK_NAMESPACES)} (not their submodules) and {BENCHMARK_FREE}")
    return found


def _is_module(dotted: str) -> bool:
    """True when `dotted` names a module or package of qlp_compress (not a class or function inside one)."""
    path = PACKAGE.joinpath(*dotted.split(".")[1:])
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


STRUCTURE_SKETCH = """A third structure, N:M sparsity (N of every M consecutive weights zero, which sparse tensor
cores run faster), would be one module, `qlp_compress/workflows/nm_sparsity.py`, registered by its name in
`base.names.STRUCTURES` and its class in `workflows.structures.STRUCTURE_CLASSES` (an import-time assertion keeps the
two equal). Its reward scores N:M masks instead of magnitude masks: `reward/spec.py` builds that scorer from the
structure's name, one more branch there. The module:

```python
class NMSparsity:
    \"\"\"N:M sparsity: per-layer N for one M, for a global share of zeros.\"\"\"

    names = ("2:4",)                     # the --structure values it serves
    cost_option = "--sparsity"           # the share of the weights removed bounds the cost
    compare_on_workers = True            # a cell times nothing

    def methods(self, name): ...         # ("qlp", "random", "uniform"): the searches and its baselines
    def baselines(self, name): ...       # ("uniform",): N the same in every layer
    def default_prune_method(self, name): ...
    def default_compare_methods(self, name): ...
    def target(self, how): ...           # how.sparsity
    def with_target(self, how, t): ...   # replace(how, sparsity=t)
    def check(self, how): ...            # the sparsity is one of the N/M this M allows
    def writes(self, run): ...           # () : model.onnx, policy.json, report.json, report.md only
    def default_out(self, model, how): ...
    def read_policy(self, how): ...
    def compress(self, run, how, ws, out, int8, chosen=None): ...
        # units = prunable layers; the search's allocation (shares of zeros) rounded to N/M per layer; the masks
        # are N:M masks (pruning gains one function beside its magnitude masks); then, as weight mode does,
        # workspace.prune_weights_and_finetune's shared step recalibrate_and_finetune, export_verified, the report
    def compare(self, run, how, ws, methods, targets, out): ...
```

The search, the reward (a RewardSpec any process rebuilds), fine-tuning, export and verification are shared: the
plug-in says only what is pruned, in which units, how an allocation is applied, and which option bounds the cost."""


def structures_doc() -> str:
    """The plug-in interface, from workflows/structures.py's docstring (its first paragraph is the title line)."""
    doc = ast.get_docstring(ast.parse((PACKAGE / "workflows" / "structures.py").read_text())) or ""
    return doc.split("\n\n", 1)[1] if "\n\n" in doc else doc


def markdown(parts: dict[str, Part]) -> str:
    lines = ["# Architecture", "",
             "Generated by `python tools/architecture.py` from the package's own docstrings and imports; "
             "`tests/test_architecture.py` fails when a rule below is broken or this file is stale.", "",
             "Rules: each part imports only the parts its docstring allows; nothing imports the CLI; "
             f"onnxruntime runs only in `deploy.engine`; `torch.onnx.export` is called only in `deploy.export`; "
             f"the search imports no onnx, onnxruntime or onnx2torch; no module has more than {MAX_LINES} lines; "
             f"the CLI imports at most {CLI_MAX_IMPORTS} project modules (the package root's version aside); "
             "a benchmark (`benchmarks/*.py`) imports of the package only `qlp_compress.workflows` (its namespace, "
             "never a submodule), `qlp_compress.base`, and, to drive the command as a user does, `qlp_compress.cli` "
             "(its namespace).", "",
             "| part | owns | may import | imports today | libraries |", "|---|---|---|---|---|"]
    heavy = {"onnx", "onnxruntime", "onnx2torch", "onnxslim", "torch_pruning", "torch", "torchvision", "typer",
             "rich", "matplotlib", "numpy"}
    for part in parts.values():
        today = sorted({part_of(i) for m in part.modules for i in m.imports} - {part.name, ""})
        libs = sorted({lib for m in part.modules for lib in m.libraries} & heavy)
        lines.append(f"| `{part.name}` | {part.summary} | {', '.join(sorted(part.may_import)) or '—'} | "
                     f"{', '.join(today) or '—'} | {', '.join(libs) or '—'} |")
    lines += ["", "## Structures", "", structures_doc(), "", STRUCTURE_SKETCH]
    lines += ["", "## Modules", "", "| module | lines | imports (project modules) |", "|---|---:|---|"]
    for part in parts.values():
        for m in sorted(part.modules, key=lambda m: m.name):
            lines.append(f"| `{m.name}` | {m.lines} | {len(m.imports - {m.name})} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parts = read_parts()
    text = markdown(parts)
    if "--check" in sys.argv:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale; run python tools/architecture.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    for line in violations(parts) + benchmark_violations():
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
