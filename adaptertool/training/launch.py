"""``train --devices N``: the same command on N processes of this machine, started by torchrun's own
launcher (``torch.distributed.run``), which this process runs in place of ``torchrun --standalone``.

When a process fails, torchrun stops the others and reports every failure. Instead, the processes
it starts here leave their one-line errors in the error file torchrun gives each of them, and the
launcher prints one line: the failure that started it (a process killed by a signal or failing on
its own before the others' collectives broke), and the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from adaptertool.errors import AdapterToolError, CollectiveError, ProcessError

__all__ = ["LAUNCHED", "launch", "reported_elsewhere"]

LAUNCHED = "ADAPTERTOOL_LAUNCHED"  # set for the processes launch() starts


def launch(args: list[str], processes: int, *, checkpoint_dir: Path) -> None:
    """Run ``adaptertool ARGS`` on ``processes`` local processes and wait for them.

    Raises:
        AdapterToolError: one or more processes failed (naming the first, how, and the last checkpoint).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from adaptertool.training.state import latest_checkpoint

    # torchrun's agent logs every failure and stop (its loggers set their own levels); the summary below says it once
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHED] = "1"
    # torchrun would set 1 (and warn); the cores shared out suit CPU processes, and GPU ones hardly use them
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={processes}", "--module", "adaptertool", *args]))
    except (ChildFailedError, SignalException) as err:
        folder = latest_checkpoint(checkpoint_dir)
        last = f"the last checkpoint, {folder}, is intact (--resume {folder})" if folder else "no checkpoint was written"
        if isinstance(err, SignalException):  # this launcher was stopped (Ctrl-C, kill): torchrun stopped the processes
            raise AdapterToolError(f"stopped by {signal.Signals(err.sigval).name}; every process was stopped; {last}") from None
        raise ProcessError(f"{_first_failure(err.failures)}; {last}") from None
    finally:
        os.environ.pop(LAUNCHED, None)


def reported_elsewhere(err: BaseException) -> bool:
    """Whether this process should keep ``err`` to itself: under :func:`launch` it goes to torchrun's
    error file for the launcher's one line; started by torchrun directly, the first process reports
    the errors every process meets alike, and each process its own (:class:`ProcessError`)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(LAUNCHED) and error_file:
        record = {"message": str(err), "timestamp": int(time.time()), "collective": isinstance(err, CollectiveError)}
        Path(error_file).write_text(json.dumps(record), encoding="utf-8")
        return True
    return int(os.environ.get("RANK", "0")) > 0 and not isinstance(err, ProcessError)


def _first_failure(failures: dict[int, Any]) -> str:
    """The failure that started it: a signal first (out of memory, a kill), then an error of the
    process's own, then the collectives that broke because of it, then the processes torchrun
    stopped; the earliest of a kind."""
    def order(item: tuple[int, Any]) -> tuple[int, int, int]:
        rank, failure = item
        if failure.exitcode < 0:  # SIGTERM: how torchrun stops the others
            kind = 3 if -failure.exitcode == signal.SIGTERM else 0
        else:
            kind = 2 if failure.error_file_data.get("collective") else 1
        return kind, failure.timestamp, rank

    rank, failure = min(failures.items(), key=order)
    if failure.exitcode < 0:
        code = -failure.exitcode
        name = signal.Signals(code).name if code in signal.valid_signals() else f"signal {code}"
        hint = " (out of memory? the kernel's log, dmesg, names what the OOM killer stopped)" if name == "SIGKILL" else ""
        return f"rank {rank} (pid {failure.pid}) was killed by {name}{hint}; the other processes were stopped"
    message = failure.error_file_data.get("message")
    if isinstance(message, str):
        return message
    return f"rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}; run with --debug for its traceback"
