"""convert --to gguf: a PEFT LoRA adapter as the GGUF file llama.cpp loads (``--lora`` of llama-cli and
llama-server, ``ADAPTER`` in an Ollama Modelfile).

Names, layout and scaling are :mod:`adaptertool.adapters.gguf_lora`'s; the file is written by the
gguf package (:mod:`adaptertool.io.gguf_files`) as llama.cpp's convert_lora_to_gguf.py writes it,
and for a plain LoRA the two files hold the same tensors and metadata. The base's config.json
(``--base``, else the adapter's base_model_name_or_path; from the Hub, config.json alone) gives the
architecture, the head counts that order q/k rows and the shapes every module is checked against.

What llama.cpp cannot apply is refused before anything is written, rather than dropped: DoRA's
magnitude rescale, ``lora_B.bias``, full tensors (modules_to_save, trainable tokens), IA3, LoHa/LoKr/
AdaLoRA factors (re-factor them with ``convert --rank`` first), embedding LoRAs on a base with tied
embeddings, and modules with no llama.cpp tensor; so are activated LoRAs, which llama.cpp's
converter writes. The file is built in memory (adapters are small) and staged beside OUT.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaptertool.adapters.gguf_lora import GgufBase, GgufTarget, gguf_factors, gguf_target, scale_fold
from adaptertool.adapters.peft_keys import module_order
from adaptertool.errors import AdapterToolError, InputError, OptionError
from adaptertool.io import check_output, read_json, staged_file
from adaptertool.io.gguf_files import write_gguf_lora
from adaptertool.io.hub_ids import hub_id_of_cache_path, source_name
from adaptertool.ops.adapter_inputs import AdapterModule, LoadedAdapter, load_adapter, plan_adapter, read_checked
from adaptertool.ops.convert import factor_dtype
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes

__all__ = ["GgufConvertConfig", "GgufConvertReport", "convert_to_gguf"]

_GGUF_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_MERGE_INSTEAD = "merge the adapter into its base instead (adaptertool merge), then convert that with llama.cpp's convert_hf_to_gguf.py"


@dataclass(frozen=True, kw_only=True)
class GgufConvertConfig:
    adapter: Path
    out: Path  # one file, e.g. adapter.gguf
    base: Path | None = None  # a folder holding the base's config.json; None: the adapter's base_model_name_or_path
    dtype: torch.dtype | None = None  # None: the adapter's factor dtype (float32 unless it is float16 or bfloat16)
    force: bool = False

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in _GGUF_DTYPES:
            raise OptionError(f"--dtype for --to gguf must be fp32, fp16 or bf16, not {self.dtype}")


@dataclass(frozen=True, kw_only=True)
class GgufConvertReport:
    out: str
    architecture: str  # general.architecture
    base_config: str  # the config.json it came from: its path, or the Hub id it was downloaded from
    modules: int
    ranks: list[int]  # the distinct ranks, ascending
    alpha: float  # adapter.lora.alpha
    dtype: str  # F32, F16 or BF16
    folded: int  # modules whose PEFT scaling is not llama.cpp's alpha / r, multiplied into lora_b
    file_bytes: int
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0


def convert_to_gguf(cfg: GgufConvertConfig, *, progress: bool = False) -> GgufConvertReport:
    """Write ``cfg.adapter`` as the GGUF LoRA file ``cfg.out``; see the module docstring.

    Raises:
        AdapterToolError: what llama.cpp cannot apply (naming the module or tensor), a base whose
            config.json is missing or of another architecture, or factors that do not fit the base.
    """
    clock = Stopwatch()
    check_output(cfg.out, force=cfg.force, inputs=[cfg.adapter])
    notes: list[str] = []
    with closing(load_adapter(cfg.adapter, 1.0)) as adapter:
        planned, copies = _plan(adapter)
        config_path = _base_config(cfg.base, adapter, notes)
        base = GgufBase.from_config(read_json(config_path), source=str(config_path))
        targets = {name: _target(adapter, module, base) for name, module in planned.items()}
        _check_copies(adapter, copies, base)
        if copies:
            notes.append(f"{len(copies)} copies of base layers (PEFT's save_embedding_layers) left out: the base holds them")
        dtype = cfg.dtype or factor_dtype(adapter)
        dtype = dtype if dtype in _GGUF_DTYPES else torch.float32
        alpha = adapter.settings.alpha
        tensors: list[tuple[str, torch.Tensor]] = []
        ranks: set[int] = set()
        folded = 0
        for name in tqdm(sorted(planned, key=module_order), desc="gguf", disable=not progress):
            update, target = planned[name].update, targets[name]
            parts = ("lora_embedding_A", "lora_embedding_B") if target.embedding else ("lora_A", "lora_B")
            lora_a, lora_b = (read_checked(adapter, update.keys[part]) for part in parts)
            rank = int(lora_a.shape[0])
            fold = scale_fold(update.scaling, alpha, rank)
            a, b = gguf_factors(lora_a, lora_b, target=target, fold=fold)
            tensors += [(f"{target.tensor}.lora_a", a.to(dtype)), (f"{target.tensor}.lora_b", b.to(dtype))]
            ranks.add(rank)
            folded += fold != 1.0
    if folded:
        notes.append(f"{folded} modules have a scaling other than llama.cpp's alpha/r (rsLoRA or alpha_pattern): "
                     "folded into lora_b")
    with staged_file(cfg.out, force=cfg.force, inputs=[cfg.adapter]) as tmp:
        size = write_gguf_lora(tmp, tensors, architecture=base.architecture, alpha=alpha, card_folder=cfg.adapter,
                               name=hub_id_of_cache_path(cfg.adapter))
    return GgufConvertReport(
        out=str(cfg.out), architecture=base.architecture, base_config=source_name(config_path), modules=len(planned),
        ranks=sorted(ranks), alpha=alpha, dtype=_GGUF_DTYPES[dtype], folded=folded, file_bytes=size, notes=notes,
        seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )


def _plan(adapter: LoadedAdapter) -> tuple[dict[str, AdapterModule], list[str]]:
    """The adapter's LoRA modules and the keys of its copies of base layers, from headers; anything
    llama.cpp cannot apply is refused."""
    path = adapter.path
    if adapter.config.get("alora_invocation_tokens"):
        raise InputError(f"{path}: is an activated LoRA (alora_invocation_tokens); --to gguf writes plain LoRAs, "
                         "so use llama.cpp's convert_lora_to_gguf.py for it")
    whole, planned = plan_adapter(adapter)
    # PEFT saves the base weight of an adapted embed_tokens/lm_head beside its LoRA (save_embedding_layers);
    # it is the base's own, unless the vocabulary was resized (_check_copies).
    copies = [key for key in whole if key.endswith(".base_layer.weight")]
    full = [key for key in whole if key not in copies]
    if full:
        raise InputError(f"{path}: tensor {full[0]} is a full weight (modules_to_save or trainable tokens), "
                         f"which llama.cpp's LoRA loader cannot apply; {_MERGE_INSTEAD}")
    if not planned:
        raise InputError(f"{path}: holds no adapter module; there is nothing to convert")
    for name, module in planned.items():
        update = module.update
        if update.kind == "ia3":
            why = "IA3, which rescales weights instead of adding B @ A; llama.cpp applies LoRA only"
        elif update.kind not in ("lora", "lora_embedding"):
            why = (f"{update.kind.upper()}, not LoRA factors; re-factor the adapter as a LoRA first "
                   "(adaptertool convert ADAPTER LORA --rank R)")
        elif update.dora:
            why = f"DoRA (lora_magnitude_vector), whose rescaling llama.cpp cannot apply; {_MERGE_INSTEAD}"
        elif update.changes_bias:
            why = f"a LoRA with lora_B.bias (lora_bias), which llama.cpp cannot apply; {_MERGE_INSTEAD}"
        elif update.fan_in_fan_out:
            why = "stored fan_in_fan_out (GPT-2 Conv1D layout), which no architecture --to gguf maps uses"
        else:
            continue
        raise InputError(f"{path}: module {name} is {why}")
    return planned, copies


def _base_config(base: Path | None, adapter: LoadedAdapter, notes: list[str]) -> Path:
    """The base's config.json: in ``base``, else where base_model_name_or_path points (a folder, or a
    Hub id whose config.json alone is downloaded)."""
    if base is None:
        named = adapter.settings.base_model
        if not named:
            raise InputError(f"{adapter.path}: adapter_config.json has no base_model_name_or_path; pass --base BASE "
                             "(the base model's folder or Hub id) for its architecture")
        if Path(named).is_dir():
            base = Path(named)
        else:
            from adaptertool.ops.hub import resolve_config  # imports huggingface_hub: only when needed

            try:
                base = resolve_config(named)
            except AdapterToolError as err:
                raise InputError(f"{adapter.path}: base_model_name_or_path {named} is not a folder here ({err}); "
                                 "pass --base BASE") from err
            notes.append(f"the base's config.json came from the Hub: {named}")
    config = base / "config.json"
    if not config.is_file():
        raise InputError(f"{base}: has no config.json; --base must be the base model's folder or Hub id")
    return config


def _check_copies(adapter: LoadedAdapter, copies: list[str], base: GgufBase) -> None:
    """Refuse a saved base layer that is not the base's: PEFT saves embed_tokens and lm_head, both
    (vocab, hidden), and saves them on its own when the vocabulary was resized."""
    for key in copies:
        shape = list(adapter.weights[key].shape)
        if shape != [base.vocab, base.hidden]:
            raise InputError(f"{adapter.path}: tensor {key} is a {shape} copy of a base layer but the base's "
                             f"vocabulary is [{base.vocab}, {base.hidden}]: a resized vocabulary, which llama.cpp's "
                             f"LoRA cannot apply; {_MERGE_INSTEAD}")


def _target(adapter: LoadedAdapter, module: AdapterModule, base: GgufBase) -> GgufTarget:
    """``module``'s llama.cpp tensor, checked against the base's shape, as llama.cpp checks it when loading."""
    try:
        target = gguf_target(module.name, base)
    except AdapterToolError as err:
        raise type(err)(f"{adapter.path}: {err}") from None
    if module.shape != target.shape:
        raise InputError(f"{adapter.path}: module {module.name} fits a {list(module.shape or ())} weight but the "
                         f"base's {target.tensor} is {list(target.shape)} by its config.json; is it the right base?")
    return target
