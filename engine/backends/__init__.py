"""Backends that run a bundle's components stage by stage from the host (ONNX Runtime, CPU or CUDA).

TensorRT runs the whole chain on the GPU instead: see engine/trt_pipeline.py. engine/runtime.py picks.
"""
