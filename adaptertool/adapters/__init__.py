"""Adapter formats and their pure tensor maths (no file access)."""

from adaptertool.adapters.peft_keys import ADAPTER_PARTS, PEFT_PREFIX, split_adapter_key

__all__ = ["ADAPTER_PARTS", "PEFT_PREFIX", "split_adapter_key"]
