"""options: the shared device, SVD settings and float dtype check, and the configs that use them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from adaptertool.errors import AdapterToolError
from adaptertool.ops.combine import CombineConfig
from adaptertool.ops.convert import ConvertConfig
from adaptertool.ops.extract import ExtractConfig
from adaptertool.ops.init import InitConfig
from adaptertool.ops.merge import MergeConfig
from adaptertool.ops.options import DEVICES, SvdSettings, check_device, check_float_dtype, resolve_device
from adaptertool.ops.reshard import ReshardConfig
from adaptertool.ops.train import TrainConfig

_P = Path("unused")


@pytest.mark.parametrize("name", DEVICES)
def test_check_device_accepts_the_three_names(name: str) -> None:
    check_device(name)


def test_check_device_names_the_choices() -> None:
    with pytest.raises(AdapterToolError, match=r"^--device must be cpu, cuda or auto, not 'tpu'$"):
        check_device("tpu")


@pytest.mark.parametrize("cuda", [False, True], ids=["no-cuda", "cuda"])
def test_resolve_device(monkeypatch: pytest.MonkeyPatch, cuda: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if cuda else "cpu")
    if cuda:
        assert resolve_device("cuda") == torch.device("cuda")
    else:
        with pytest.raises(AdapterToolError, match=r"^--device cuda, but torch sees no CUDA device; use --device cpu or auto$"):
            resolve_device("cuda")
    with pytest.raises(AdapterToolError, match="--device must be cpu, cuda or auto"):
        resolve_device("gpu")


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_check_float_dtype_accepts_floats_and_none(dtype: torch.dtype | None) -> None:
    check_float_dtype(dtype)


def test_check_float_dtype_names_the_option() -> None:
    with pytest.raises(AdapterToolError, match=r"^--dtype must be a float type, not torch\.int8$"):
        check_float_dtype(torch.int8)
    with pytest.raises(AdapterToolError, match=r"^--out-dtype must be a float type, not torch\.bool$"):
        check_float_dtype(torch.bool, option="--out-dtype")


def test_svd_settings_defaults_and_validation() -> None:
    settings = SvdSettings()
    assert (settings.method, settings.niter, settings.oversample) == ("randomized", 6, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.niter = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        SvdSettings("exact")  # type: ignore[misc]  # keyword-only
    with pytest.raises(AdapterToolError, match=r"^--svd must be randomized or exact, not 'full'$"):
        SvdSettings(method="full")
    for bad in ({"niter": -1}, {"oversample": -1}):
        with pytest.raises(AdapterToolError, match=r"^--niter and --oversample must be >= 0$"):
            SvdSettings(**bad)


def test_svd_configs_expose_their_settings() -> None:
    extract = ExtractConfig(base=_P, tuned=_P, out=_P, svd="exact", niter=2, oversample=4)
    assert extract.svd_settings == SvdSettings(method="exact", niter=2, oversample=4)
    convert = ConvertConfig(adapter=_P, out=_P, export=True, niter=3)
    assert convert.svd_settings == SvdSettings(niter=3)
    combine = CombineConfig(adapters=(_P,), out=_P, svd="exact")
    assert combine.svd_settings == SvdSettings(method="exact")  # extract's niter and oversample


_CONFIGS: dict[str, Callable[..., Any]] = {
    "merge": lambda **kw: MergeConfig(base=_P, adapters=((_P, 1.0),), out=_P, **kw),
    "extract": lambda **kw: ExtractConfig(base=_P, tuned=_P, out=_P, **kw),
    "convert": lambda **kw: ConvertConfig(adapter=_P, out=_P, export=True, **kw),
    "combine": lambda **kw: CombineConfig(adapters=(_P,), out=_P, **kw),
    "init": lambda **kw: InitConfig(base=_P, out=_P, **kw),
    "reshard": lambda **kw: ReshardConfig(source=_P, out=_P, **kw),
}


@pytest.mark.parametrize("command", _CONFIGS)
def test_configs_refuse_a_non_float_dtype(command: str) -> None:
    _CONFIGS[command](dtype=torch.bfloat16)
    with pytest.raises(AdapterToolError, match=r"^--dtype must be a float type, not torch\.int32$"):
        _CONFIGS[command](dtype=torch.int32)


@pytest.mark.parametrize("command", ["merge", "extract", "convert", "combine"])
def test_svd_and_device_configs_refuse_bad_values(command: str) -> None:
    if command in ("extract", "convert", "combine"):
        with pytest.raises(AdapterToolError, match=r"^--svd must be randomized or exact, not 'full'$"):
            _CONFIGS[command](svd="full")
    if command in ("merge", "extract"):
        with pytest.raises(AdapterToolError, match=r"^--device must be cpu, cuda or auto, not 'tpu'$"):
            _CONFIGS[command](device="tpu")


def test_train_config_uses_the_shared_device_message() -> None:
    with pytest.raises(AdapterToolError, match=r"^--device must be cpu, cuda or auto, not 'tpu'$"):
        TrainConfig(base=_P, data=_P, out=_P, device="tpu")
