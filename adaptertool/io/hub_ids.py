"""Hub ids recovered from paths, without importing huggingface_hub (commands that only record
where their inputs came from should not pay for that import)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["hub_id_of_cache_path", "source_name"]


def hub_id_of_cache_path(path: str | Path) -> str | None:
    """``org/name`` when ``path`` lies in a Hub cache snapshot (``models--org--name/snapshots/<commit>``)."""
    parts = Path(path).parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots" and part.count("--") == 2:
            return "/".join(part.split("--")[1:])
    return None


def source_name(path: str | Path) -> str:
    """How to record an input: its Hub id when it came from the Hub cache, else the path as given."""
    return hub_id_of_cache_path(path) or str(path)
