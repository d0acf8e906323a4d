"""ONNX files alone, torch-free. The graph passes (`passes`), TensorRT parser lint (`lint`),
the fp16 graph with fp32 islands (`fp16`), FLOPs of a graph (`flops`).
"""
