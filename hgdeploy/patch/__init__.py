"""A recipe made into loaded, planned and patched PyTorch models (`models`), the one
tau calibration (`tau`), and their export to a checked ONNX graph (`export`).
"""
