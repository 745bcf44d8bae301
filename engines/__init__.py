"""Models, their ONNX export and the inference backends that serve them."""
