"""Pruning: magnitude masks and the baseline allocators (weight mode), policies, channel groups from Torch-Pruning
with the option-A shortcut rewrite, the per-layer latency table and the baseline width allocations (channel mode).

May import: base, data, deploy, train."""
