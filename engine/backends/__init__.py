"""Backends that run a bundle's components stage by stage from the host (ONNX Runtime, CPU or CUDA).

A backend has ``name`` and ``precision`` and ``load(bundle, component)``, which returns a stage: a
callable taking the component's inputs as numpy arrays by name and returning its output (a tuple when
it has several). TensorRT runs the whole chain on the GPU instead: see engine/trt_pipeline.py.
engine/runtime.py picks one for the machine.
"""
