"""Post-training quantisation: a float model's weights into a quantised model's.

`gptq`, `awq`, `smoothquant`: the methods, on one weight matrix. `calibration`: activation
statistics of a model on batches. `weights`: a float model's parameters to a quantised model's.
What a quantised model runs (the uniform quantiser, the int8 matmuls) lives with the layers
(`t5lite.layers.quant`, `t5lite.layers.int8_matmul`), below the models this package converts.
"""
