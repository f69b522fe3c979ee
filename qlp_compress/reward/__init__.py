"""Rewards: how the search scores an allocation (accuracy of the pruned network on the reward split), for weight
and for channel mode.

May import: base, data, deploy, pruning, train."""
