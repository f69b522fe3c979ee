"""End to end at a tiny budget: search → prune → fine-tune → export → verify → report, through the CLI (Typer's
app in this process, through CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_app

from qlp_compress.deploy import export
from qlp_compress.deploy.engine import open_session
from qlp_compress.pruning.masks import pruned_count

pytestmark = pytest.mark.slow  # whole pipelines through the CLI; the parts have fast tests of their own


@pytest.fixture(scope="module")
def tiny(tiny_task) -> tuple[Path, Path]:
    """A small LeNet-5 ONNX model trained a few steps on a learnable .npz task (28×28, 4 classes): conftest's
    session-wide tiny task."""
    return tiny_task / "lenet.onnx", tiny_task / "data.npz"


def test_search_end_to_end(tiny, searched, tmp_path, qlp):
    """conftest's shared search run (12 episodes in 2 stages, the answer chosen among 3 candidates, 0.5 epoch of
    fine-tuning), then prune --policy and finetune on its result."""
    model, data = tiny
    out, _ = searched
    for name in ("model.onnx", "model.sparse.onnx", "policy.json", "report.json", "report.md", "sparsity.png",
                 "reward.png"):
        assert (out / name).is_file(), name
    assert not (out / ".work").exists()
    policy = json.loads((out / "policy.json").read_text())
    report = json.loads((out / "report.json").read_text())
    # the target is met to the weight, and the file holds what the policy says, layer by layer
    total = sum(layer["weights"] for layer in policy["layers"])
    removed = sum(pruned_count(layer["sparsity"], layer["weights"]) for layer in policy["layers"])
    assert removed == round(0.8 * total)
    proto = onnx.load(str(out / "model.onnx"))
    file_weights = export.weight_initializers(proto)
    zeros_in_file = sorted(int((w == 0).sum()) for w in file_weights.values())
    assert len(zeros_in_file) == len(policy["layers"])
    expected = sorted(pruned_count(layer["sparsity"], layer["weights"]) for layer in policy["layers"])
    assert all(abs(a - b) <= 1 for a, b in zip(zeros_in_file, expected, strict=True))
    # one policy per curriculum stage, the last at the target
    assert [round(s["target"], 6) for s in policy["stages"]][-1] == 0.8
    assert len(policy["search"]["rewards"]) == 12
    assert policy["search"]["reward_engine"] == "onnxruntime"  # the fast engine works on imported graphs
    # the answer is the most accurate of the candidates after brief fine-tuning, with the search's answer first
    selection = policy["search"]["selection"]
    held_out = {c["name"]: c["held_out_accuracy"] for c in selection["candidates"]}
    assert len(held_out) == 3 and selection["held_out_images"] == 100
    assert held_out[selection["chosen"]] == max(held_out.values())
    assert selection["candidates"][0]["name"] == (policy["stages"][-1]["demonstration"] or "search")
    assert f"**{selection['chosen']}**" in (out / "report.md").read_text()
    # metadata and reported accuracy agree with a fresh onnxruntime measurement of the written file
    meta = export.read_metadata(proto)
    assert meta["qlp.source_sha256"] == policy["model_sha256"]
    d = np.load(data)
    session = open_session(out / "model.onnx")
    logits = session.run(None, {session.get_inputs()[0].name: d["x_test"].astype(np.float32) / 255})[0]
    accuracy = float((logits.argmax(1) == d["y_test"]).mean())
    assert accuracy == pytest.approx(report["accuracy"]["finetuned"])
    assert float(meta["qlp.finetuned_test_accuracy"]) == pytest.approx(accuracy, abs=1e-4)
    # the sparse-storage file gives the same outputs and is smaller
    sparse = open_session(out / "model.sparse.onnx")
    sparse_logits = sparse.run(None, {sparse.get_inputs()[0].name: d["x_test"].astype(np.float32) / 255})[0]
    np.testing.assert_array_equal(logits, sparse_logits)
    assert (out / "model.sparse.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    assert len(onnx.load(str(out / "model.sparse.onnx")).graph.sparse_initializer) > 0
    # an existing folder is refused without --force, and left as it was
    before = (out / "model.onnx").read_bytes()
    again = qlp("search", model, "--data", data, "--out", out, cwd=tmp_path)
    assert again.code == 2 and "--force" in again.line
    assert (out / "model.onnx").read_bytes() == before

    # prune --policy applies the same per-layer sparsities; finetune keeps the zeros
    out2 = tmp_path / "replay"
    run_app("prune", str(model), "--policy", str(out / "policy.json"), "--data", str(data), "--out", str(out2),
            "--finetune-epochs", "0", "--device", "cpu")
    replay = json.loads((out2 / "policy.json").read_text())
    assert [x["sparsity"] for x in replay["layers"]] == [x["sparsity"] for x in policy["layers"]]
    tuned = tmp_path / "tuned.onnx"
    run_app("finetune", str(out2 / "model.onnx"), "--data", str(data), "--finetune-epochs", "0.5", "--out", str(tuned),
            "--device", "cpu")
    before_w = export.weight_initializers(onnx.load(str(out2 / "model.onnx")))
    after_w = export.weight_initializers(onnx.load(str(tuned)))
    before_zeros = sorted(int((w == 0).sum()) for w in before_w.values())
    after_zeros = sorted(int((w == 0).sum()) for w in after_w.values())
    assert before_zeros == after_zeros


@pytest.mark.parametrize("method", ["lamp", "global", "erk", "uniform"])
def test_prune_baselines_meet_target(tiny, tmp_path, method):
    model, data = tiny
    out = tmp_path / method
    run_app("prune", str(model), "--method", method, "--sparsity", "0.7", "--data", str(data), "--out", str(out),
            "--no-sparse-storage", "--finetune-epochs", "0", "--device", "cpu")
    policy = json.loads((out / "policy.json").read_text())
    total = sum(layer["weights"] for layer in policy["layers"])
    removed = sum(pruned_count(layer["sparsity"], layer["weights"]) for layer in policy["layers"])
    assert abs(removed - round(0.7 * total)) <= len(policy["layers"])
    _, file_sparsity = export.onnx_sparsity(onnx.load(str(out / "model.onnx")))
    assert file_sparsity == pytest.approx(removed / total, abs=1e-6)


def test_compare_table(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "cmp"
    run_app("compare", str(model), "--sparsity", "0.6", "--method", "random,lamp,uniform", "--episodes", "4",
            "--reward-images", "100", "--data", str(data), "--finetune-epochs", "0", "--out", str(out),
            "--device", "cpu")
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["random", "lamp", "uniform"]
    assert all(r["finetuned_accuracy"] is None for r in rows)
    assert "| 0.6 | lamp |" in (out / "compare.md").read_text()
