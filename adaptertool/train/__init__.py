"""The minimal LoRA/QLoRA training loop (issue #7)."""

__all__: list[str] = []
