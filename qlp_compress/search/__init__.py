"""The search (the QLP method): the pruning game over units, the DQN agent learning from demonstrations, and the
curriculum. It sees only units (their sizes, or a cost model for channel widths) and a reward function: nothing of
ONNX, onnxruntime, masks or data sets.

May import: base."""
