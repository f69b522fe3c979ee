"""Training: the model zoo (architectures for state dicts and the baselines) and the training loop (fine-tuning with
masks held, BatchNorm re-estimation, distillation).

May import: base, data."""
