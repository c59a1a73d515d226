"""Old home of :mod:`adaptertool.ops.quantized`, kept while ops/merge.py still imports from here (issue 14)."""

from adaptertool.ops.quantized import QuantizedView as FourBitView, open_quantized_view as open_fourbit_view  # noqa: F401
