"""The extract plan: BASE and TUNED checked against each other, their tensors sorted by role, and the
notes that explain what the adapter holds and why its ranks and errors are what they are.

Roles: 2-D float weights of targeted modules are factored (embeddings and the head too under
``--embeddings lora``); other embedding / head weights may be saved whole; everything else is an
"other", among which modules of only 1-D float tensors are norms that may be saved whole. Expert
weights of a mixture-of-experts base are planned by :mod:`adaptertool.ops.expert_targets`: in the
per-expert form those stored as their own tensor are factored like any Linear, those inside a fused
tensor (``expert_views``) and, in the fused form, every targeted fused parameter (``experts.params``)
by :mod:`adaptertool.ops.extract_experts`. The checks read headers, except the refusal of a LoRA on
a changed embedding that the head is tied to, which compares that one tensor.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from adaptertool.errors import InputError, OptionError
from adaptertool.io import FLOAT_CODES, Checkpoint, TensorSource, dtype_code, read_json
from adaptertool.ops.expert_targets import ExpertPlan, ExpertUnit, base_experts, plan_experts
from adaptertool.ops.targets import is_embedding, is_head, targeted

if TYPE_CHECKING:  # extract imports this module; the types are only named here
    from adaptertool.ops.extract import ExtractConfig, ModuleReport

__all__ = ["TIED_INPUTS", "ExtractPlan", "changed", "dropped_notes", "dtype_notes", "plan_extract", "rank_notes",
           "same_values"]

TIED_INPUTS = ("embed_tokens", "wte", "word_embeddings")  # input embeddings a missing head is tied to
_DTYPE_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp64"}  # as --dtype spells them
_NOISE_DOMINATES = 0.5  # share of the residual energy above which rounding noise "is" the error


@dataclass
class ExtractPlan:
    """Each tensor of BASE by role; a module name is its weight's name less ``.weight``."""

    linear: dict[str, str] = field(default_factory=dict)  # module -> weight tensor name, of every factored module
    transposed: set[str] = field(default_factory=set)  # stored (in, out): Conv1D, and embeddings as LoRA
    embedding_lora: set[str] = field(default_factory=set)  # written with PEFT's lora_embedding_A/B names
    embeddings: list[str] = field(default_factory=list)  # embedding / head weight tensor names
    others: list[str] = field(default_factory=list)  # every other tensor (norms, unmatched biases...)
    norms: dict[str, list[str]] = field(default_factory=dict)  # module holding only 1-D tensors -> its tensors
    tied_head: bool = False  # lm_head.weight absent: the head is the input embedding
    experts: ExpertPlan | None = None  # a mixture-of-experts base's experts, as targeted
    expert_views: list[ExpertUnit] = field(default_factory=list)  # per-expert form: experts inside fused tensors

    @property
    def units(self) -> dict[str, ExpertUnit]:
        """Per-expert module -> its expert (the per-expert form), for reports."""
        return {unit.module: unit for unit in self.experts.units} if self.experts is not None else {}

    @property
    def weights(self) -> dict[str, str]:
        """Every factored module or fused parameter -> a tensor that stores (part of) its weight."""
        params = self.experts.params if self.experts is not None else ()
        return {**self.linear, **{u.module: u.where.tensor for u in self.expert_views},
                **{p.path: p.layer.weight(0, p.projections[0]).tensor for p in params}}

    @property
    def modules(self) -> list[str]:
        """Every module that may get a Linear LoRA: the factored weights' and the experts' inside fused tensors."""
        return [*self.linear, *(unit.module for unit in self.expert_views)]


def plan_extract(base: TensorSource, tuned: Checkpoint, cfg: ExtractConfig) -> ExtractPlan:
    """Check that the two checkpoints are one architecture and sort their tensors by role.

    Raises:
        AdapterToolError: a tensor missing on one side, shapes or float-ness that differ, a
            ``--targets`` entry matching no 2-D weight, or a changed embedding the head is tied to
            under ``--embeddings lora``.
    """
    _check_same_architecture(base, tuned, cfg)
    plan = ExtractPlan(tied_head="lm_head.weight" not in base and any(_is_embedding(n) for n in base))
    # Per-expert LoRAs by default, whatever the layout: what PEFT loads on transformers 4 and 5 alike.
    plan.experts = experts = plan_experts(base_experts(base), cfg.experts, cfg.targets, source=str(cfg.base),
                                          default="per-expert")
    stored = experts.stored if experts is not None else frozenset()
    named = tuple(t for t in cfg.targets if t != "all-linear")
    conv1d = _conv1d_layout(base)
    for name in base:
        module, _, part = name.rpartition(".")
        if name in stored:
            continue  # an expert's weight: planned as its unit below, or with its fused parameter
        if experts is not None and module in experts.not_linear and not targeted(module, named):
            plan.others.append(name)  # a router PEFT cannot wrap, reached only by all-linear
            continue
        matrix = part == "weight" and len(base[name].shape) == 2 and base[name].dtype in FLOAT_CODES
        if _is_embedding(name) and matrix and cfg.embeddings == "lora":
            plan.linear[module] = name
            if not is_head(module):  # an input embedding: PEFT's Embedding LoRA layout
                plan.transposed.add(module)
                plan.embedding_lora.add(module)
        elif _is_embedding(name):
            (plan.embeddings if matrix else plan.others).append(name)
        elif matrix and targeted(module, cfg.targets):
            plan.linear[module] = name
            if conv1d:
                plan.transposed.add(module)
        elif not (part == "bias" and module in plan.linear):
            plan.others.append(name)
    # A bias can precede its weight in storage order: reclaim those wrongly filed as "others".
    plan.others = [n for n in plan.others if n.rpartition(".")[0] not in plan.linear or not n.endswith(".bias")]
    for unit in experts.units if experts is not None else ():
        if unit.where.expert is None:
            plan.linear[unit.module] = unit.where.tensor
        else:
            plan.expert_views.append(unit)
    plan.norms = _norm_modules(base, plan.others)
    if experts is not None:  # expert weights no unit covers are others, which a note names if they changed
        covered = {u.where.tensor for u in experts.units} | {
            p.layer.weight(e, projection).tensor for p in experts.params for e in range(p.layer.experts)
            for projection in p.projections}
        plan.others += sorted(stored - covered)
    if "all-linear" not in cfg.targets:
        units = [*plan.modules, *(p.path for p in experts.params)] if experts is not None else list(plan.linear)
        for target in named:
            if not (any(targeted(m, (target,)) for m in units) or (target == "experts" and experts is not None)):
                raise OptionError(f"{cfg.base}: --targets {target} matches no 2-D weight; check the module names (e.g. q_proj)")
    _refuse_tied_embedding_lora(base, tuned, plan)
    return plan


def _check_same_architecture(base: TensorSource, tuned: Checkpoint, cfg: ExtractConfig) -> None:
    for name in base:
        if name not in tuned:
            raise InputError(f"{cfg.tuned}: has no tensor {name}, which {cfg.base} has; are BASE and TUNED the same architecture?")
        if base[name].shape != tuned[name].shape:
            raise InputError(f"{cfg.tuned}: tensor {name} has shape {list(tuned[name].shape)} but "
                             f"{list(base[name].shape)} in {cfg.base}; are BASE and TUNED the same architecture?")
        if (base[name].dtype in FLOAT_CODES) != (tuned[name].dtype in FLOAT_CODES):
            raise InputError(f"{cfg.tuned}: tensor {name} is {tuned[name].dtype} but {base[name].dtype} in {cfg.base}; "
                             "only float dtypes may differ")
    extra = next((name for name in tuned if name not in base), None)
    if extra is not None:
        raise InputError(f"{cfg.tuned}: has tensor {extra}, which {cfg.base} lacks; are BASE and TUNED the same architecture?")


def _norm_modules(base: TensorSource, others: list[str]) -> dict[str, list[str]]:
    """{module: its tensors} for the modules among ``others`` that hold only 1-D float tensors, no
    submodule with bigger ones: norms (RMSNorm, LayerNorm). PEFT's modules_to_save copies a whole
    module, so only these are cheap to save whole; a Linear's bias alone cannot be saved that way."""
    heavy: set[str] = set()  # every module (and its ancestors) holding a tensor that is not 1-D float
    for name in base:
        if len(base[name].shape) != 1 or base[name].dtype not in FLOAT_CODES:
            parts = name.split(".")
            heavy.update(".".join(parts[:i]) for i in range(1, len(parts)))
    norms: dict[str, list[str]] = {}
    for name in others:
        module = name.rpartition(".")[0]
        if module and module not in heavy and len(base[name].shape) == 1 and base[name].dtype in FLOAT_CODES:
            norms.setdefault(module, []).append(name)
    return norms


def _refuse_tied_embedding_lora(base: TensorSource, tuned: Checkpoint, plan: ExtractPlan) -> None:
    for module in plan.embedding_lora:
        if plan.tied_head and module.endswith(TIED_INPUTS) and changed(base, tuned, plan.linear[module]):
            # The head would need the same update through a second LoRA on the one shared tensor,
            # which PEFT's merge then applies twice.
            raise InputError(f"{plan.linear[module]} changed and the head is tied to it: a LoRA cannot update "
                             "tied weights once; use --embeddings save")


def _is_embedding(name: str) -> bool:
    """A tensor of an input embedding or an output head: never factored as Linear by "all-linear"."""
    module = name.rpartition(".")[0]
    return is_embedding(module) or is_head(module)


def _conv1d_layout(base: TensorSource) -> bool:
    """GPT-2 (and its Conv1D) stores every projection as (in, out), the transpose of nn.Linear."""
    if base.root is None or not (base.root / "config.json").is_file():
        return False
    config = read_json(base.root / "config.json")
    return config.get("model_type") == "gpt2" or any(str(a).startswith("GPT2") for a in config.get("architectures") or [])


def changed(base: TensorSource, tuned: Checkpoint, name: str) -> bool:
    """Whether tensor ``name`` holds other values in TUNED than in BASE."""
    return not same_values(base.read(name), tuned.read(name))


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Across dtypes compare values: a bf16 base saved again as fp32 is unchanged.
    return torch.equal(a, b) if a.dtype == b.dtype else torch.equal(a.float(), b.float())


def dtype_notes(base: TensorSource, tuned: Checkpoint) -> list[str]:
    """One note per (BASE dtype, TUNED dtype) pair that differs."""
    pairs = Counter((base[n].dtype, tuned[n].dtype) for n in base if base[n].dtype != tuned[n].dtype)
    return [f"{count} tensors are {b} in BASE but {t} in TUNED; deltas are taken in float32"
            for (b, t), count in sorted(pairs.items())]


def dropped_notes(dropped: list[str], base: TensorSource, plan: ExtractPlan) -> list[str]:
    """One note per kind of changed tensor that the adapter leaves out, saying what would carry it."""
    kinds: dict[tuple[str, str], list[str]] = {}
    for name in dropped:
        module, _, part = name.rpartition(".")
        if module in plan.norms:
            kind = ("norm tensors", "--no-norms leaves them out")
        elif part == "weight" and len(base[name].shape) == 2:
            kind = ("Linear weights outside --targets", "add their modules to --targets to extract them")
        elif part == "bias" and f"{module}.weight" in base:
            kind = ("biases of modules outside --targets",
                    "add the modules to --targets: a LoRA carries a bias as lora_B.bias")
        else:
            kind = ("tensors that a LoRA cannot carry", "the adapter cannot reproduce them")
        kinds.setdefault(kind, []).append(name)
    return [f"{len(names)} changed {what} are not in the adapter (e.g. {names[0]}); {hint}"
            for (what, hint), names in kinds.items()]


def rank_notes(modules: list[ModuleReport], tuned: Checkpoint, plan: ExtractPlan, cfg: ExtractConfig,
               out_dtype: torch.dtype) -> list[str]:
    """Why ranks or errors are what they are: the break-even size cap, and a rounding-noise floor."""
    if not modules:
        return []
    weights = plan.weights
    delta_code = Counter(tuned[weights[m.module]].dtype for m in modules).most_common(1)[0][0]
    delta_name, factor_name = (_DTYPE_NAMES.get(c, c) for c in (delta_code, dtype_code(out_dtype)))
    notes = [_size_cap_note(modules, delta_name, factor_name, out_dtype), _noise_note(modules, delta_name, cfg)]
    return [note for note in notes if note]


def _size_cap_note(modules: list[ModuleReport], delta_name: str, factor_name: str, out_dtype: torch.dtype) -> str:
    capped = [m for m in modules if m.size_capped]
    if not capped:
        return ""
    groups: dict[tuple[int, ...], tuple[int, set[str], int]] = {}  # shape -> (modules, short names, cap)
    for m in capped:
        count, names, _ = groups.get(tuple(m.shape), (0, set(), m.rank))
        groups[tuple(m.shape)] = (count + 1, names | {m.module.rpartition(".")[2]}, m.rank)
    where = "; ".join(f"{count} {'/'.join(sorted(names))} {shape[0]}x{shape[1]} at r={rank}"
                      for shape, (count, names, rank) in groups.items())
    hint = (" (--dtype bf16 factors halve their size and double the cap)"
            if out_dtype.itemsize > 2 and delta_name in ("bf16", "fp16") else "")
    return (f"{len(capped)} modules capped below the requested rank, where their {factor_name} LoRA factors "
            f"r*(out+in) would be no smaller than the dense {delta_name} delta out*in, so a low rank gains "
            f"nothing: {where}{hint}")


def _noise_note(modules: list[ModuleReport], delta_name: str, cfg: ExtractConfig) -> str:
    residual = sum((m.rel_error * m.delta_norm) ** 2 for m in modules)
    noise = sum((m.noise_floor * m.delta_norm) ** 2 for m in modules)
    if delta_name not in ("bf16", "fp16") or residual == 0 or noise < _NOISE_DOMINATES * residual:
        return ""
    total = sum(m.delta_norm**2 for m in modules)
    advice = ("--auto-rank kept only what rises above that noise" if cfg.auto_rank
              else "try --auto-rank, which keeps per module only the singular values above that noise")
    return (f"TUNED is stored in {delta_name}: its rounding noise alone leaves a relative error of about "
            f"{math.sqrt(noise / total):.2f} of the {math.sqrt(residual / total):.2f}, so most of the error is "
            f"storage noise in the delta, not fine-tune the adapter misses; {advice}")
