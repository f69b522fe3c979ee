"""The layout rules of docs/architecture.md, checked on the code: each part imports only what its docstring allows,
nothing imports the CLI, onnxruntime runs only in deploy.engine, torch.onnx.export is called only in deploy.export,
the search knows nothing of ONNX, modules stay small, the CLI stays thin, the benchmarks use only the public surface
(qlp_compress.workflows and qlp_compress.base), and the generated document is current."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def architecture():
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "tools/architecture.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["architecture"] = module
    spec.loader.exec_module(module)
    return module


def test_the_code_keeps_every_layout_rule(architecture):
    assert architecture.violations(architecture.read_parts()) == []


def test_every_part_declares_what_it_may_import(architecture):
    parts = architecture.read_parts()
    assert {"base", "cli", "data", "deploy", "importer", "pruning", "report", "reward", "search", "train",
            "workflows"} <= set(parts)
    assert parts["search"].may_import == {"base"}
    assert "cli" not in set().union(*(p.may_import for p in parts.values()))


def test_a_forbidden_import_is_caught(architecture, tmp_path, monkeypatch):
    """The checker is not blind: a search module importing onnxruntime, a library module importing the CLI, a
    second torch.onnx.export and an oversized module are each reported."""
    package = tmp_path / "qlp_compress"
    for part, doc in (("search", "May import: base."), ("deploy", "May import: base."), ("cli", "May import: base.")):
        (package / part).mkdir(parents=True)
        (package / part / "__init__.py").write_text(f'"""{part}.\n\n{doc}"""\n')
    (package / "__init__.py").write_text("")
    (package / "search" / "agent.py").write_text("import onnxruntime\nfrom qlp_compress.cli import app\n")
    (package / "deploy" / "engine.py").write_text("import torch\ntorch.onnx.export(None, None, None)\n"
                                                  + "x = 1\n" * 401)
    (package / "cli" / "commands.py").write_text("from qlp_compress.search import agent\n")
    monkeypatch.setattr(architecture, "PACKAGE", package)
    found = "\n".join(architecture.violations(architecture.read_parts()))
    assert "qlp_compress.search.agent imports onnxruntime" in found
    assert "qlp_compress.search.agent imports the CLI" in found
    assert "qlp_compress.search.agent imports cli, which search may not import" in found
    assert "qlp_compress.deploy.engine calls torch.onnx.export" in found
    assert "qlp_compress.deploy.engine has 403 lines" in found
    assert "qlp_compress.cli.commands imports search, which cli may not import" in found


def test_the_benchmarks_import_only_the_public_surface(architecture):
    assert list(architecture.BENCHMARKS.glob("*.py"))
    assert architecture.benchmark_violations() == []


def test_a_benchmark_reaching_below_the_public_surface_is_caught(architecture, tmp_path, monkeypatch):
    """The benchmark checker is not blind: an internal module and a submodule of workflows are each reported; the
    public namespace and base are not."""
    (tmp_path / "fake.py").write_text(
        "import qlp_compress.search.env\n"
        "from qlp_compress.workflows.weights import allocator\n"
        "from qlp_compress import data as datasets\n"
        "from qlp_compress.workflows import weights\n"
        "from qlp_compress.workflows import PruningEnv, compare_weights, open_workspace\n"
        "from qlp_compress.base.io import atomic_write_json\n"
        "from qlp_compress.base import machine\n"
        "def later():\n"
        "    from qlp_compress.deploy import engine\n")
    monkeypatch.setattr(architecture, "BENCHMARKS", tmp_path)
    found = architecture.benchmark_violations()
    reported = {line.split(";")[0] for line in found}
    assert reported == {"benchmarks/fake.py:1 imports qlp_compress.search.env",
                        "benchmarks/fake.py:2 imports qlp_compress.workflows.weights",
                        "benchmarks/fake.py:3 imports qlp_compress.data",
                        "benchmarks/fake.py:4 imports qlp_compress.workflows.weights",
                        "benchmarks/fake.py:9 imports qlp_compress.deploy.engine"}, found


def test_docs_architecture_is_current(architecture):
    text = architecture.markdown(architecture.read_parts())
    assert architecture.DOC.read_text() == text, "docs/architecture.md is stale: run python tools/architecture.py"
