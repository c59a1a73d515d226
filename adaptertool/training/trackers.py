"""Where a training run's metrics go besides OUT/train_log.jsonl: TensorBoard and Weights & Biases
(``train --report-to``), each an optional extra.

Each step's record (step, loss, lr, grad_norm, tokens, tokens_per_s, eval_loss when measured) is
logged as scalars ``train/<name>`` (``eval/loss`` for eval_loss) at its step. TensorBoard's event
files are written live under the checkpoint folder (``tensorboard/``: point ``tensorboard --logdir``
there while the run goes) and land in OUT with the adapter. A W&B run takes the run's options as its
config; its project is ``$WANDB_PROJECT`` or ``adaptertool``, and wandb's own variables apply
throughout (``WANDB_MODE=offline`` keeps it on this machine, ``WANDB_DIR`` says where).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adaptertool.errors import OptionError

__all__ = ["REPORT_TO", "TENSORBOARD_DIR", "Trackers"]

REPORT_TO = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
_INSTALL = {"tensorboard": "pip install tensorboard (or adaptertool[tensorboard])",
            "wandb": "pip install wandb (or adaptertool[wandb])"}


def _scalar_name(key: str) -> str:
    return "eval/loss" if key == "eval_loss" else f"train/{key}"


class Trackers:
    """The trackers ``names`` asks for, opened at once so a missing package fails before training."""

    def __init__(self, names: Iterable[str], *, folder: Path, config: dict[str, Any], run_name: str) -> None:
        """
        Args:
            names: of :data:`REPORT_TO`.
            folder: the run's checkpoint folder: TensorBoard's events go under it.
            config: the run's options, for W&B's run config.
            run_name: W&B's run name (OUT's name).

        Raises:
            AdapterToolError: an unknown name, or its package not installed.
        """
        self._writers: list[Any] = []
        self._wandb: Any = None
        for name in dict.fromkeys(names):
            if name not in REPORT_TO:
                raise OptionError(f"--report-to must be one of {', '.join(REPORT_TO)}, not {name!r}")
            try:
                if name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    self._writers.append(SummaryWriter(log_dir=str(folder / TENSORBOARD_DIR)))
                else:
                    import wandb

                    # its files go where wandb puts them ($WANDB_DIR, else ./wandb), not under the checkpoint
                    # folder: an offline run must outlive the default one, which goes once OUT is written
                    self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "adaptertool"), name=run_name,
                                             config=config)
            except ImportError as err:
                self.close()
                raise OptionError(f"--report-to {name} needs the {name} package: {_INSTALL[name]}") from err

    def log(self, record: dict[str, Any]) -> None:
        """One step's record, as scalars at its step."""
        step = int(record["step"])
        scalars = {_scalar_name(k): float(v) for k, v in record.items() if k not in ("step", "epoch")}
        scalars["train/epoch"] = float(record["epoch"])
        for writer in self._writers:
            for name, value in scalars.items():
                writer.add_scalar(name, value, step)
            writer.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self, *, failed: bool = False) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None
