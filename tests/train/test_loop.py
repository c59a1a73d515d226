"""The training loop on a tiny Llama (our Decoder with LoRA): resume is bit-exact, NaN stops the run,
gradient accumulation equals a larger batch, optimizers and their checkpointed state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from adaptertool.errors import AdapterToolError
from adaptertool.ops.examples import TINY, write_llama
from adaptertool.training.data import Batch, Example, build_dataset
from adaptertool.training.loop import LoopConfig, LoopResult, evaluate, make_optimizer, train_loop
from adaptertool.training.lora import LoraSpec
from adaptertool.training.state import latest_checkpoint, load_state
from adaptertool.training.weights import load_decoder
from tests.train import Faulty


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("loop") / "base"
    write_llama(base, TINY, dtype=torch.float32)
    return base


def _model(base: Path, dropout: float = 0.1) -> nn.Module:
    return load_decoder(base, lora=LoraSpec(rank=4, alpha=8.0, dropout=dropout), seed=0)


def _batches(n_examples: int = 12, batch_size: int = 2, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n_examples):
        length = int(torch.randint(4, 13, (1,), generator=g))
        ids = torch.randint(3, TINY.vocab, (length,), generator=g).tolist()
        examples.append(Example(ids, [-100] * 2 + ids[2:]))  # a masked "prompt" of 2 tokens
    return build_dataset(examples, seq_len=16, batch_size=batch_size, packing=False, pad_id=0, seed=seed).batches


CFG = LoopConfig(max_steps=6, grad_accum=2, lr=5e-3, warmup=2, schedule="cosine", save_every=2, seed=7)


def _run(model: nn.Module, batches: list[Batch], tmp: Path, cfg: LoopConfig = CFG, **kw: object) -> LoopResult:
    return train_loop(model, batches, cfg=cfg, device=torch.device("cpu"), adapter_config={"peft_type": "LORA"},
                      fingerprint={"run": 1}, checkpoint_dir=tmp, log_path=tmp / "log.jsonl", **kw)


def test_interrupt_and_resume_gives_the_same_adapter_bit_for_bit(tiny_base: Path, tmp_path: Path) -> None:
    batches = _batches()  # 6 batches: 6 steps x 2 micro-batches = 2 epochs, so resume crosses an epoch
    full = _model(tiny_base)
    whole = _run(full, batches, tmp_path / "a")
    # Interrupt in step 5 (micro-batch 9): the newest checkpoint is step 4.
    interrupted = Faulty(_model(tiny_base), at_call=9, fault="interrupt")
    with pytest.raises(KeyboardInterrupt):
        _run(interrupted, batches, tmp_path / "b")
    checkpoint = latest_checkpoint(tmp_path / "b")
    assert checkpoint is not None and checkpoint.name == "step-000004"
    fresh = _model(tiny_base)  # a new process would start from a fresh model
    resumed = _run(fresh, batches, tmp_path / "b", resume=load_state(tmp_path / "b"))
    expected, got = full.adapter_state_dict(), fresh.adapter_state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed.steps == whole.steps == 6 and resumed.tokens == whole.tokens
    # The log of the resumed run is the uninterrupted one's, step for step (timings aside).
    strip = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in whole.log]
    assert [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in resumed.log] == strip
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 6
    # Dropout mattered: without the restored RNG state the result would differ.
    assert any(not torch.equal(expected[n], _model(tiny_base).adapter_state_dict()[n]) for n in expected)


def test_resume_with_other_options_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    batches = _batches()
    _run(_model(tiny_base), batches, tmp_path, cfg=LoopConfig(max_steps=4, save_every=2, seed=7))
    state = load_state(tmp_path)
    with pytest.raises(AdapterToolError, match="--resume: the checkpoint was made with different run"):
        train_loop(_model(tiny_base), batches, cfg=CFG, device=torch.device("cpu"), adapter_config={},
                   fingerprint={"run": 2}, resume=state)


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tiny_base: Path, tmp_path: Path) -> None:
    model = Faulty(_model(tiny_base), at_call=7, fault="nan")  # step 4's first micro-batch
    with pytest.raises(AdapterToolError, match=r"the loss became nan at step 4; training stopped; "
                                               r"the last good checkpoint is .*step-000002 \(resume with --resume"):
        _run(model, _batches(), tmp_path)
    state = load_state(tmp_path)
    assert state.step == 2 and len(state.log) == 2
    assert all(torch.isfinite(t).all() for t in state.adapter.values())
    # The NaN never reached the weights: the live model still holds finite LoRA factors.
    assert all(torch.isfinite(t).all() for t in model.adapter_state_dict().values())


def test_nan_before_any_checkpoint_says_so(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterToolError, match=r"no checkpoint was saved before it \(see --save-every\)"):
        _run(Faulty(_model(tiny_base), at_call=1, fault="nan"), _batches(), tmp_path)


def test_grad_accumulation_equals_one_larger_batch(tiny_base: Path, tmp_path: Path) -> None:
    examples_seed = 3
    small, large = _batches(8, 2, examples_seed), _batches(8, 4, examples_seed)
    # Same examples, no shuffling differences: one epoch of 1 step each (4 micro-batches of 2 vs 2 of 4).
    a, b = _model(tiny_base, dropout=0.0), _model(tiny_base, dropout=0.0)
    cfg = LoopConfig(max_steps=1, lr=1e-2, seed=0, max_grad_norm=0.0)
    train_loop(a, small, cfg=LoopConfig(**{**cfg.__dict__, "grad_accum": 4}), device=torch.device("cpu"),
               adapter_config={}, fingerprint={})
    train_loop(b, large, cfg=LoopConfig(**{**cfg.__dict__, "grad_accum": 2}), device=torch.device("cpu"),
               adapter_config={}, fingerprint={})
    sa, sb = a.adapter_state_dict(), b.adapter_state_dict()
    start = _model(tiny_base, dropout=0.0).adapter_state_dict()
    assert any(not torch.equal(sa[n], start[n]) for n in sa)  # it trained
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-5, atol=1e-6)  # summation order differs; a wrong accumulation is off by ~lr


def test_max_micro_stops_after_the_epochs(tiny_base: Path, tmp_path: Path) -> None:
    batches = _batches()  # 6 micro-batches
    result = train_loop(_model(tiny_base), batches, cfg=LoopConfig(max_steps=2, max_micro=6, grad_accum=4),
                        device=torch.device("cpu"), adapter_config={}, fingerprint={})
    assert result.steps == 2
    assert result.tokens == sum(b.tokens for b in batches)  # one epoch exactly: the last step took 2


@pytest.mark.parametrize("optim", ["sgd", "adamw8bit"])
def test_other_optimizers_train_and_resume_exactly(tiny_base: Path, tmp_path: Path, optim: str) -> None:
    batches = _batches()
    cfg = LoopConfig(max_steps=3, save_every=2, lr=1e-2, optim=optim)
    straight = _model(tiny_base, dropout=0.0)
    before = evaluate(straight, batches, device=torch.device("cpu"))
    _run(straight, batches, tmp_path / "a", cfg=cfg)  # 3 steps; its step-2 checkpoint is kept
    # It trained: LoRA B starts at zero, and the loss on the training data went down.
    final = straight.adapter_state_dict()
    assert all(final[n].abs().max() > 0 for n in final if n.endswith("lora_B.weight"))
    assert evaluate(straight, batches, device=torch.device("cpu")) < before
    # 2 steps, save, load into a fresh model and optimizer, 1 step: the same adapter as 3 straight steps.
    # An optimizer state lost or misread on resume (SGD's momentum, the 8-bit moments) changes step 3.
    state = load_state(tmp_path / "a")
    assert state.step == 2 and state.optimizer
    resumed = _model(tiny_base, dropout=0.0)
    _run(resumed, batches, tmp_path / "b", cfg=cfg, resume=state)
    got = resumed.adapter_state_dict()
    assert got.keys() == final.keys()
    for name in final:
        assert torch.equal(got[name], final[name]), name


def test_paged_adamw_needs_cuda() -> None:
    with pytest.raises(AdapterToolError, match="--optim paged_adamw .* needs a CUDA device"):
        make_optimizer("paged_adamw", [nn.Parameter(torch.zeros(2))], lr=1.0, weight_decay=0.0,
                       device=torch.device("cpu"))
