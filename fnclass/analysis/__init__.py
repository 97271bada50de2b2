"""Analysis programs over trained checkpoints: per-example gradients, scores and influence."""
