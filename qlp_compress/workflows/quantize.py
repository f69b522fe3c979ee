"""int8 workflows: FILE.onnx → FILE.int8.onnx beside a compressed model, and the `quantize` command on any float
ONNX classifier."""

from __future__ import annotations

from pathlib import Path

from qlp_compress import data as datasets
from qlp_compress.base.errors import UsageError
from qlp_compress.base.io import check_file_size, sha256_file
from qlp_compress.deploy import engine
from qlp_compress.deploy.quantize import QuantizeSettings, check_float_model, int8_path, write_int8
from qlp_compress.importer import batch_free, read_onnx
from qlp_compress.importer import sniff as _sniff
from qlp_compress.report.progress import phase
from qlp_compress.workflows.workspace import DataSettings, Workspace, check_can_write


def quantize_beside(ws: Workspace, float_path: Path, settings: QuantizeSettings,
                    float_accuracy: float | None = None) -> dict:
    """FILE.onnx → FILE.int8.onnx, calibrated on the workspace's reward split, compared on its test split."""
    with phase(f"int8: quantize {float_path.name} (calibrate, check, measure accuracy)"):
        return write_int8(float_path.read_bytes(), int8_path(float_path), ws.splits.reward, ws.splits.test, settings,
                      float_accuracy, name=str(float_path))


def quantize_file(model_path: Path, out: Path, data_settings: DataSettings, settings: QuantizeSettings,
                  command: str = "", force: bool = False) -> dict:
    """The `quantize` command: any float ONNX classifier → a verified int8 file, calibrated on the reward split
    of `data_settings`, its test accuracy compared with the float model's."""
    check_can_write(out, force)
    if out.resolve() == model_path.resolve():
        raise UsageError(f"--out {out} is the input model; choose another file name")
    check_file_size(model_path, "model")
    if _sniff(model_path) != "onnx":
        raise UsageError(f"{model_path} is a PyTorch file; quantize takes an ONNX model: export it first with "
                         f"`qlp-compress export {model_path} --out MODEL.onnx`")
    proto = read_onnx(model_path)
    check_float_model(proto, str(model_path))
    data = datasets.load_dataset(data_settings.data, data_settings.data_dir)
    # a file exported at a fixed batch size is made batch-free (checked against the file), as `export` does, so
    # that any number of calibration and test images can be fed
    raw = batch_free(proto, model_path, data.input_shape).SerializeToString()  # external data is inside now
    engine.check_input_fits(engine.open_session(raw), data.input_shape, data.num_classes)
    splits = datasets.make_splits(data, data_settings.reward_size, data_settings.split_seed)
    with phase(f"int8: quantize {model_path.name} (calibrate, check, measure accuracy)"):
        info = write_int8(raw, out, splits.reward, splits.test, settings, name=str(model_path),
                          metadata={"qlp.float_source_sha256": sha256_file(model_path), "qlp.command": command})
    return {"model": str(model_path), "data": data.name, "test_images": len(splits.test), **info}
