"""The pruning engine, shared by every network: the mask pytree, BP (block search with straight-through gates), CP (channel criteria and global selection), and the speed-aware selection."""
