"""Hub ids: what parses, what is a usage error, and cache paths mapped back to ids."""

from __future__ import annotations

import pytest

from adaptertool.errors import AdapterToolError
from adaptertool.io.hub import HubRef, hub_id_of_cache_path, parse_hub_id


@pytest.mark.parametrize(("text", "expected"), [
    ("org/name", HubRef("org/name")),
    ("HuggingFaceTB/SmolLM2-135M", HubRef("HuggingFaceTB/SmolLM2-135M")),
    ("org/name@v1.0", HubRef("org/name", "v1.0")),
    ("org/name@refs/pr/3", HubRef("org/name", "refs/pr/3")),  # a revision may hold "/"
    ("org/name@" + "a" * 40, HubRef("org/name", "a" * 40)),
])
def test_valid_ids(text: str, expected: HubRef) -> None:
    assert parse_hub_id(text) == expected and str(expected) == text


@pytest.mark.parametrize("text", ["name", "org/name@", "org/na..me", "org/na--me", "org/-name", "a/b/c", "org/na me"])
def test_invalid_ids(text: str) -> None:
    with pytest.raises(AdapterToolError, match="is not a Hub id; expected org/name or org/name@revision"):
        parse_hub_id(text)


def test_revision_given_twice() -> None:
    assert parse_hub_id("org/name", revision="dev") == HubRef("org/name", "dev")
    assert parse_hub_id("org/name@dev", revision="dev") == HubRef("org/name", "dev")
    with pytest.raises(AdapterToolError, match="names revision 'v1' and --revision says 'dev'; give one"):
        parse_hub_id("org/name@v1", revision="dev")


@pytest.mark.parametrize(("path", "expected"), [
    ("/home/u/.cache/huggingface/hub/models--org--name/snapshots/" + "0" * 40, "org/name"),
    ("/c/hub/models--org--name/snapshots/" + "0" * 40 + "/adapter_model.safetensors", "org/name"),
    ("/c/hub/models--org--name/blobs/abc", None),
    ("/home/u/models/org/name", None),
])
def test_cache_paths_map_back_to_ids(path: str, expected: str | None) -> None:
    assert hub_id_of_cache_path(path) == expected
