"""The inference runtime: tiling, batching policy, worker supervision."""
