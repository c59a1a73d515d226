"""Training MoE decoders (adaptertool/training/moe.py) against transformers 5.25 and PEFT 0.21, in float32
on the CPU: Qwen3-MoE, Qwen2-MoE (shared expert), Mixtral and OLMoE, tiny random models built by
transformers with trained-looking weights (tests/train's randomise_), saved per expert and fused.

Oracles: transformers' logits and ``aux_loss`` (its load-balancing loss, which weights tokens by the
attention mask, as ours does); a float64 dense pass over all experts; PEFT's gradients and logits.
PEFT 0.21 loads a per-expert (target_modules) adapter by converting it to target_parameters, except on
qwen2_moe itself, where it ignores the expert LoRAs (moe-fp8.md 5.1): that case uses the conversion
written with adapters/expert_lora.py, and a test records what PEFT does with the adapter as saved.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from adaptertool.adapters.expert_lora import expert_factors, fuse_gate_up, param_lora_keys, stack_experts
from adaptertool.cli import cli
from adaptertool.errors import AdapterToolError
from adaptertool.io import Checkpoint, TensorSpec, write_adapter
from adaptertool.training import Decoder, FrozenLinear, LoRALinear, LoraSpec, load_decoder
from adaptertool.training.data import Batch
from adaptertool.training.loop import LoopConfig, train_loop
from adaptertool.training.moe import ParamLora, SparseMoe, param_lora_tensors
from tests.train import batch, randomise_
from tests.train.test_lora import _randomise_b_

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

COMMON: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "head_dim": 8, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# Expert size 24 (!= hidden, 2 x 24 != hidden): a transposed weight cannot pass. Each family with what it adds.
FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"moe_intermediate_size": 24, "intermediate_size": 40, "num_experts": 4, "num_experts_per_tok": 2,
                  "norm_topk_prob": True},
    "qwen2_moe": {"moe_intermediate_size": 24, "intermediate_size": 40, "shared_expert_intermediate_size": 40,
                  "num_experts": 4, "num_experts_per_tok": 2, "mlp_only_layers": [1]},  # raw softmax weights; a dense layer
    "mixtral": {"intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"intermediate_size": 24, "num_experts": 4, "num_experts_per_tok": 2},  # q/k norm over all heads
}
RANK, ALPHA = 2, 4.0


@pytest.fixture(scope="module")
def moe_models(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """family -> {"hf": transformers model, "per-expert"/"fused": its folder, with the tiny word tokenizer}."""
    root = tmp_path_factory.mktemp("moe")
    vocab = json.loads((tiny["base"] / "config.json").read_text())["vocab_size"]
    models = {}
    for family, settings in FAMILIES.items():
        config = transformers.AutoConfig.for_model(family, vocab_size=vocab, **COMMON, **settings)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        randomise_(model, seed=0)
        entry: dict[str, Any] = {"hf": model}
        for layout in ("per-expert", "fused"):
            folder = entry[layout] = root / family / layout
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # eos_token_id outside OLMoE's default vocabulary, before ours is set
                model.save_pretrained(folder, save_original_format=layout == "per-expert")
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(tiny["base"] / name, folder / name)
        models[family] = entry
    return models


def _spec(form: str) -> LoraSpec:
    """LoRA on every Linear, the experts' in ``form``; "frozen": on attention only, the experts stacked."""
    if form == "frozen":
        return LoraSpec(rank=RANK, alpha=ALPHA, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    return LoraSpec(rank=RANK, alpha=ALPHA, dropout=0.0, experts=form)


def _load(folder: Path, form: str, **kwargs: Any) -> Decoder:
    ours = load_decoder(folder, lora=_spec(form), **kwargs)
    assert [b.experts.stacked for b in _moe_blocks(ours)] == [form == "frozen"] * len(_moe_blocks(ours))
    return ours


def _moe_blocks(model: Decoder) -> list[SparseMoe]:
    return [m for m in model.modules() if isinstance(m, SparseMoe)]


def _targets(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' labels and our aligned targets (position t predicts t + 1), for real tokens predicted from
    real ones (a padded position's output is arbitrary: ours attends to itself, transformers' to nothing)."""
    labels = ids.masked_fill(~mask, -100)
    labels[:, 1:].masked_fill_(~mask[:, :-1], -100)
    return labels, torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


@pytest.mark.parametrize(("layout", "form"), [("per-expert", "per-expert"), ("fused", "per-expert"), ("fused", "frozen")])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_aux_loss_match_transformers(moe_models: dict[str, dict[str, Any]], family: str, layout: str,
                                                form: str) -> None:
    ours = _load(moe_models[family][layout], form).eval()
    hf = moe_models[family]["hf"]
    coef = ours.config.moe.router_aux_loss_coef
    assert coef == hf.config.router_aux_loss_coef
    ids, mask = batch(ours.config.vocab_size, seed=3)  # left-padded, right-padded and full rows
    no_targets = torch.full_like(ids, -100)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask.long(), output_router_logits=True)
        got = ours(ids, attention_mask=mask)
        aux = ours.loss_sum(ids, no_targets, attention_mask=mask, aux_weight=1.0) / coef
        unpadded = hf(input_ids=ids, output_router_logits=True).aux_loss
        aux_unpadded = ours.loss_sum(ids, no_targets, aux_weight=1.0) / coef
    torch.testing.assert_close(got[mask], want.logits[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(aux, want.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(aux_unpadded, unpadded, atol=1e-6, rtol=0)
    assert abs(float(aux - aux_unpadded)) > 1e-4  # padding is left out of the loss: the mask matters


def test_fused_checkpoint_reads_each_fused_tensor_once(moe_models: dict[str, dict[str, Any]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    read = Checkpoint.read

    def counted(self: Checkpoint, name: str, **kwargs: Any) -> torch.Tensor:
        reads.append(name)
        return read(self, name, **kwargs)

    monkeypatch.setattr(Checkpoint, "read", counted)
    load_decoder(moe_models["mixtral"]["fused"], lora=_spec("per-expert"))
    fused = [name for name in reads if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert sorted(fused) == sorted(set(fused)) and len(fused) == 2 * COMMON["num_hidden_layers"]


def _effective(block: SparseMoe, e: int, projection: str) -> torch.Tensor:
    """Expert e's float64 ``W + scaling B A`` for ``projection``, whichever form its LoRA takes."""
    if block.experts.stacked:
        return getattr(block.experts, f"{projection}_weights")[e].double()
    expert = getattr(block.experts, str(e))
    linear = getattr(expert, block.layer.linear_module(e, projection).rsplit(".", 1)[1])
    if isinstance(linear, LoRALinear):
        return (linear.base.weight + linear.scaling * linear.lora_B @ linear.lora_A).double()
    weight = linear.weight.double()
    lora: ParamLora | None = getattr(block.experts, "down_proj" if projection == "down" else "gate_up_proj")
    if lora is None:
        return weight
    a, b = lora.factors(e)
    rows = {"gate": slice(0, weight.shape[0]), "up": slice(weight.shape[0], None), "down": slice(None)}[projection]
    return weight + lora.scaling * (b[rows] @ a).double()


def _dense_reference(block: SparseMoe, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the router's top-k weights (zero for the rest), in float64."""
    flat = x.reshape(-1, x.shape[-1]).double()
    probs = F.softmax(flat @ block.gate.weight.double().T, dim=-1)
    top, chosen = probs.topk(block.spec.top_k, dim=-1)
    if block.spec.normalize:
        top = top / top.sum(-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter_(1, chosen, top)  # (N, E)
    out = torch.zeros_like(flat)
    for e in range(block.spec.experts):
        gate, up, down = (_effective(block, e, p) for p in ("gate", "up", "down"))
        out += weights[:, e:e + 1] * ((F.silu(flat @ gate.T) * (flat @ up.T)) @ down.T)
    if block.shared_expert is not None:
        shared = {n: (m.base.weight + m.scaling * m.lora_B @ m.lora_A if isinstance(m, LoRALinear) else m.weight).double()
                  for n, m in block.shared_expert.named_children()}
        mlp = (F.silu(flat @ shared["gate_proj"].T) * (flat @ shared["up_proj"].T)) @ shared["down_proj"].T
        out += torch.sigmoid(flat @ block.shared_expert_gate.weight.double().T) * mlp
    return out.view(x.shape)


@pytest.mark.parametrize("form", ["per-expert", "fused", "frozen"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_routed_experts_equal_a_dense_pass_over_all_experts(moe_models: dict[str, dict[str, Any]], family: str,
                                                            form: str) -> None:
    ours = _load(moe_models[family]["per-expert"], form, seed=1).eval()
    _randomise_b_(ours)
    block = _moe_blocks(ours)[0].double()  # both sides in float64: the difference is the routing's alone
    for linear in block.modules():
        if isinstance(linear, FrozenLinear):
            linear.compute_dtype = torch.float64
    x = torch.randn(3, 7, ours.config.hidden_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        got = block(x, None)
    assert (_dense_reference(block, x) - got).abs().max() < 1e-6


def test_expert_dropout_masks_each_routed_input(moe_models: dict[str, dict[str, Any]],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-expert LoRAs with dropout, in training mode: expert e's LoRA sees its routed rows of the one
    mask drawn for all experts (here a fixed pattern), scaled by 1 / (1 - p); output and LoRA gradients
    equal a float64 reference, token by token."""
    p = 0.5
    ours = load_decoder(moe_models["qwen3_moe"]["per-expert"], lora=LoraSpec(rank=RANK, alpha=ALPHA, dropout=p), seed=1)
    _randomise_b_(ours)
    block = _moe_blocks(ours)[0].train()
    assert block.experts._grouped_loras()  # every expert Linear in one node per projection
    drawn: list[torch.Tensor] = []

    def fixed(x: torch.Tensor, prob: float) -> torch.Tensor:  # a different pattern for each draw
        assert prob == p
        drawn.append((torch.arange(x.numel()) % (3 + len(drawn)) != 0).view(x.shape))
        return drawn[-1]

    monkeypatch.setattr("adaptertool.training.lora.dropout_mask", fixed)
    x = torch.randn(2, 5, ours.config.hidden_size, generator=torch.Generator().manual_seed(2), requires_grad=True)
    got = block(x, None).reshape(-1, x.shape[-1])
    assert len(drawn) == 3  # one mask per projection for all experts
    masks = dict(zip(("gate", "up", "down"), drawn))
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    (got * weights).sum().backward()
    params = {n: q for n, q in block.named_parameters() if q.requires_grad} | {"x": x}
    grads = {n: q.grad.clone() for n, q in params.items()}
    for q in params.values():
        q.grad = None

    flat = x.reshape(-1, x.shape[-1]).double()
    probs = F.softmax(flat @ block.gate.weight.double().T, dim=-1)
    top, chosen = probs.topk(block.spec.top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True) if block.spec.normalize else top
    order = chosen.flatten().argsort(stable=True)  # the masks' rows: token-slots sorted by expert
    want = [torch.zeros(flat.shape[1], dtype=torch.float64) for _ in range(flat.shape[0])]
    for row, slot in enumerate(order.tolist()):
        token, e = slot // block.spec.top_k, int(chosen.flatten()[slot])
        expert = getattr(block.experts, str(e))

        def lora(name: str, v: torch.Tensor, projection: str, expert: Any = expert, row: int = row) -> torch.Tensor:
            m = getattr(expert, name)
            kept = v * masks[projection][row].double() / (1 - p)
            return v @ m.base.weight.double().T + m.scaling * (kept @ m.lora_A.double().T) @ m.lora_B.double().T

        v = flat[token]
        hidden = F.silu(lora("gate_proj", v, "gate")) * lora("up_proj", v, "up")
        want[token] = want[token] + top.flatten()[slot] * lora("down_proj", hidden, "down")
    want_out = torch.stack(want)
    (want_out * weights.double()).sum().backward()
    assert (got.double() - want_out).abs().max() < 1e-5
    for name, q in params.items():
        torch.testing.assert_close(grads[name], q.grad, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert sum(bool(g.abs().max() > 0) for g in grads.values()) > 0.5 * len(grads)


def _to_target_parameters(ours: Decoder) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our per-expert adapter in the target_parameters form PEFT 0.21 converts such adapters to: gate and up
    fused per expert into one LoRA of rank 2r (B block-diagonal), at alpha 2 x alpha (the same scaling)."""
    state, config = ours.adapter_state_dict(), ours.adapter_config(base_model_name_or_path="base")
    for block in _moe_blocks(ours):
        layer, experts = block.layer, block.experts

        def factors(e: int, projection: str, layer: Any = layer) -> tuple[torch.Tensor, torch.Tensor]:
            prefix = f"base_model.model.{layer.linear_module(e, projection)}"
            return state.pop(f"{prefix}.lora_A.weight"), state.pop(f"{prefix}.lora_B.weight")

        keys = param_lora_keys(layer.module, list(layer.params))
        fused = [fuse_gate_up(factors(e, "gate"), factors(e, "up"), interleaved=False) for e in range(experts.count)]
        down = [factors(e, "down") for e in range(experts.count)]
        for param, parts in (("gate_up_proj", fused), ("down_proj", down)):
            state[keys[param][0]], state[keys[param][1]] = stack_experts(parts)
    expert_names = {layer_name.rsplit(".", 1)[1] for b in _moe_blocks(ours) for layer_name in
                    (b.layer.linear_module(0, p) for p in ("gate", "up", "down"))}
    shared = {n.rsplit(".", 1)[1] for n, m in ours.named_modules() if isinstance(m, LoRALinear) and ".shared_expert." in n}
    config["target_modules"] = sorted(set(config["target_modules"]) - (expert_names - shared))
    config["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    config["rank_pattern"], config["alpha_pattern"] = {"gate_up_proj": 2 * RANK}, {"gate_up_proj": 2 * ALPHA}
    return state, config


def _write(folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    write_adapter(folder, config, [TensorSpec(k, "F32", tuple(t.shape)) for k, t in state.items()], state.__getitem__)
    return folder


def _peft_grads_as_ours(ours: Decoder, peft_grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's gradients (converted target_parameters LoRAs) under our per-expert names: the diagonal blocks."""
    grads = {n: peft_grads[f"base_model.model.{n}"] for n, p in ours.named_parameters()
             if p.requires_grad and ".experts." not in n}
    for block in _moe_blocks(ours):
        layer = block.layer
        (gu_a, gu_b), (down_a, down_b) = ((peft_grads[a.removesuffix(".weight")], peft_grads[b.removesuffix(".weight")])
                                          for a, b in param_lora_keys(layer.module, list(layer.params)).values())
        for e in range(layer.experts):
            a, b = expert_factors(gu_a, gu_b, e, experts=layer.experts)  # rank 2r: gate's r, then up's
            gate, up, down = (layer.linear_module(e, p) for p in ("gate", "up", "down"))
            grads[f"{gate}.lora_A"], grads[f"{up}.lora_A"] = a[:RANK], a[RANK:]
            grads[f"{gate}.lora_B"], grads[f"{up}.lora_B"] = b[:layer.intermediate, :RANK], b[layer.intermediate:, RANK:]
            grads[f"{down}.lora_A"], grads[f"{down}.lora_B"] = expert_factors(down_a, down_b, e, experts=layer.experts)
    return grads


@pytest.mark.parametrize("form", ["per-expert", "fused", "frozen"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_gradients_match_peft(moe_models: dict[str, dict[str, Any]], tmp_path: Path, family: str, form: str) -> None:
    """One forward and backward of transformers' training loss, CE mean + coef x aux, with padding (frozen
    experts: the attention LoRAs' gradients come back through the stacked experts' backward)."""
    base = moe_models[family]["per-expert"]
    ours = _load(base, form, seed=1)
    _randomise_b_(ours)
    if form == "per-expert" and family == "qwen2_moe":  # which PEFT would not convert
        state, config = _to_target_parameters(ours)
    else:  # as saved; PEFT converts a per-expert one on load
        state, config = ours.adapter_state_dict(), ours.adapter_config(base_model_name_or_path=str(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's spurious rank_pattern warning on converted adapters
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(moe_models[family]["hf"]), _write(tmp_path, state, config),
                                                is_trainable=True)
    ids, mask = batch(ours.config.vocab_size, seed=4)
    labels, targets = _targets(ids, mask)
    n = int((targets != -100).sum())
    (ours.loss_sum(ids, targets, attention_mask=mask, aux_weight=n) / n).backward()
    theirs(input_ids=ids, attention_mask=mask.long(), labels=labels, output_router_logits=True).loss.backward()
    peft_grads = {n.replace(".default", "").removesuffix(".weight"): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}
    if form != "per-expert":  # one to one: our parameters under their PEFT keys
        keys = {id(p): key.removesuffix(".weight") for key, p in param_lora_tensors(ours)}
        got = {keys.get(id(p), f"base_model.model.{n}"): p.grad for n, p in ours.named_parameters() if p.requires_grad}
        want = peft_grads
    else:
        got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
        want = _peft_grads_as_ours(ours, peft_grads)
    assert got.keys() == want.keys()
    for name, grad in got.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, want[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert sum(bool(g.abs().max() > 0) for g in got.values()) > 0.8 * len(got)  # zero: an expert no token chose


def test_peft_ignores_per_expert_loras_on_qwen2_moe(moe_models: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """PEFT 0.21 on transformers 5 loads the per-expert adapter of a qwen2_moe model without its expert LoRAs
    (moe-fp8.md 5.1): its logits are ours with those LoRAs zeroed. The saved adapter is still the format
    transformers 4 + PEFT, init and merge read; the gradient test checks the experts through the conversion."""
    base = moe_models["qwen2_moe"]["per-expert"]
    ours = load_decoder(base, lora=_spec("per-expert"), seed=1).eval()
    _randomise_b_(ours)
    folder = _write(tmp_path, ours.adapter_state_dict(), ours.adapter_config(base_model_name_or_path=str(base)))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(moe_models["qwen2_moe"]["hf"]), folder).eval()
    ids, mask = batch(ours.config.vocab_size, seed=5)
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask.long()).logits
        full = ours(ids, attention_mask=mask)
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear) and ".experts." in name:
                module.lora_B.zero_()
        without_experts = ours(ids, attention_mask=mask)
    torch.testing.assert_close(without_experts[mask], want[mask], atol=1e-5, rtol=0)
    assert (full - want)[mask].abs().max() > 1e-3


def test_aux_loss_is_exact_under_gradient_accumulation(moe_models: dict[str, dict[str, Any]]) -> None:
    """Two micro-batches of one step train on CE summed over both / targets + coef x the mean of their aux losses."""
    base = moe_models["mixtral"]["per-expert"]
    lr, coef = 0.5, 0.1
    model = load_decoder(base, lora=_spec("per-expert"), seed=1, router_aux_loss_coef=coef)
    _randomise_b_(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    micro = []
    for seed, length in ((6, 9), (7, 6)):
        ids, mask = batch(model.config.vocab_size, seed=seed, length=length)
        micro.append(Batch(input_ids=ids, labels=_targets(ids, mask)[0], attention_mask=mask))
    cfg = LoopConfig(max_steps=1, grad_accum=2, lr=lr, optim="sgd", max_grad_norm=0.0, seed=0)
    train_loop(model, micro, cfg=cfg, device=torch.device("cpu"), adapter_config={}, fingerprint={})
    reference = load_decoder(base, lora=_spec("per-expert"), seed=1)
    _randomise_b_(reference)
    n_targets = sum(b.targets for b in micro)
    loss = torch.zeros(())
    for b in micro:
        targets = torch.cat([b.labels[:, 1:], torch.full_like(b.labels[:, :1], -100)], dim=1)
        no_targets = torch.full_like(targets, -100)
        ce = reference.loss_sum(b.input_ids, targets, attention_mask=b.attention_mask)
        aux = reference.loss_sum(b.input_ids, no_targets, attention_mask=b.attention_mask, aux_weight=1.0)
        loss = loss + ce / n_targets + coef * aux / reference.config.moe.router_aux_loss_coef / len(micro)
    loss.backward()
    for name, param in reference.named_parameters():
        if param.requires_grad:  # SGD's first step: p - lr x grad
            stepped = dict(model.named_parameters())[name].detach()
            torch.testing.assert_close((start[name] - stepped) / lr, param.grad, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_keeps_the_router_loss_gradients(moe_models: dict[str, dict[str, Any]]) -> None:
    """The router statistics leave each recomputed block as a side output; their gradient must survive."""
    grads = []
    for checkpointing in (False, True):
        model = load_decoder(moe_models["qwen2_moe"]["per-expert"], lora=_spec("per-expert"), seed=1,
                             gradient_checkpointing=checkpointing).train()
        _randomise_b_(model)
        ids, mask = batch(model.config.vocab_size, seed=9)
        model.loss_sum(ids, _targets(ids, mask)[1], attention_mask=mask, aux_weight=1e3).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_qlora_keeps_routers_16_bit_and_trains(moe_models: dict[str, dict[str, Any]]) -> None:
    model = load_decoder(moe_models["qwen2_moe"]["fused"], lora=_spec("fused"), qlora=True, seed=1).train()
    block = _moe_blocks(model)[0]
    assert block.gate.quantized is None and block.shared_expert_gate is not None and block.shared_expert_gate.quantized is None
    assert getattr(block.experts, "0").gate_proj.quantized is not None
    _randomise_b_(model)
    ids, mask = batch(model.config.vocab_size, seed=10)
    model.loss_sum(ids, _targets(ids, mask)[1], attention_mask=mask, aux_weight=1.0).backward()
    assert block.experts.gate_up_proj is not None and block.experts.gate_up_proj.lora_A.grad.abs().max() > 0


@pytest.mark.parametrize(("bad", "message"), [
    ({"dropout": 0.05}, "no dropout; use --experts per-expert or --dropout 0"),
    ({"dora": True}, "no DoRA; use --experts per-expert"),
])
def test_fused_expert_loras_refuse_what_peft_lacks(moe_models: dict[str, dict[str, Any]], bad: dict[str, Any],
                                                   message: str) -> None:
    spec = LoraSpec(rank=RANK, experts="fused", **{"dropout": 0.0, **bad})
    with pytest.raises(AdapterToolError, match=message):
        load_decoder(moe_models["mixtral"]["per-expert"], lora=spec)


@pytest.mark.parametrize(("family", "form", "layout"), [
    ("qwen3_moe", "per-expert", "per-expert"), ("mixtral", "per-expert", "fused"), ("olmoe", "fused", "fused"),
    ("qwen2_moe", "fused", "per-expert"),
])
def test_cli_trains_an_adapter_that_peft_loads(moe_models: dict[str, dict[str, Any]], tiny: dict[str, Path],
                                               tmp_path: Path, family: str, form: str, layout: str) -> None:
    base, out = moe_models[family][layout], tmp_path / "adapter"
    args = ["train", str(base), str(tiny["train"]), str(out), "--rank", str(RANK), "--alpha", str(ALPHA), "--dropout",
            "0", "--seq-len", "16", "--max-steps", "2", "--lr", "1e-2", "--device", "cpu", "--experts", form,
            "--router-aux-loss-coef", "0.05", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    state = load_file(out / "adapter_model.safetensors")
    expert = next(iter(_moe_blocks(load_decoder(base, lora=_spec(form))))).layer
    if form == "fused":
        assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        assert all({a, b} <= state.keys() for a, b in param_lora_keys(expert.module, list(expert.params)).values())
    else:
        assert "target_parameters" not in config
        assert f"base_model.model.{expert.linear_module(3, 'up')}.lora_A.weight" in state  # experts.3.up_proj / w3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(moe_models[family]["hf"]), out).eval()
    assert not [str(w.message) for w in caught if "missing" in str(w.message) or "nexpected" in str(w.message)]
    ours = load_decoder(base, lora=_spec(form)).eval()
    ours.load_adapter_state_dict(state)
    ids, mask = batch(ours.config.vocab_size, seed=8)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = theirs(input_ids=ids, attention_mask=mask.long()).logits
        untrained = moe_models[family]["hf"](input_ids=ids, attention_mask=mask.long()).logits
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)
    assert (got - untrained)[mask].abs().max() > 1e-4  # it trained: the comparison means something
