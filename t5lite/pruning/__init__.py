"""Pruning: a trained model's weights set to zero (unstructured, N:M) or removed (structured).

`criteria`: which weights of one matrix [K inputs, N outputs] to keep (magnitude, N:M, Wanda).
`weights`: a model's attention and MLP kernels pruned by a method, one matrix per layer.
`structured`: whole attention heads and MLP channels removed, giving a smaller `ModelConfig`.
`gradual`: a sparsity schedule (Zhu & Gupta 2017) and masks kept in the optimizer state, for
pruning during training.
"""
