"""Quantised models for inference.

`core`: the uniform quantiser. `gptq`, `awq`, `smoothquant`, `llm_int8`: the methods, on one
weight matrix. `calibration`: activation statistics of a model on a seqio task. `weights`: a
float model's parameters to a quantised model's. The layers use `core` and the run-time
matmuls, so this package imports nothing here (importing `weights` would import the models).
"""
