"""Deploy: ONNX export (the one call of torch.onnx.export), the onnxruntime engine (every session, the accuracy
loop, latency, the agreement check), sparse storage and int8 quantization.

May import: base, data."""
