"""NF4/FP4 quantisation maths (pure tensors; issue #4)."""

__all__: list[str] = []
