"""Rewards: how the search scores an allocation (accuracy of the pruned network on the reward split), for weight
and for channel mode; the reward's picklable description (RewardSpec), from which any process builds the same
scorer; and the Ray workers that score a batch of allocations in parallel.

May import: base, data, deploy, pruning, train."""
