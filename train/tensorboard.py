"""Optional TensorBoard scalars of a run (train.run --tensorboard), beside metrics.jsonl.

Per epoch: the training loss, the training and test accuracy, the mean Omega (training and test) and
each layer's, and the learning rate; at the end: the clean and robust accuracy of the end-of-run
evaluation and each LIF layer's firing rate and silent share. They go to RUN/<run>/tensorboard
(``tensorboard --logdir RUN``). It needs the tensorboard package: ``pip install 'mpd-triton[tensorboard]'``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MISSING", "EpochLog", "log_final", "LOG_FOLDER"]

LOG_FOLDER = "tensorboard"


def _missing() -> str | None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return "--tensorboard needs the tensorboard package: pip install 'mpd-triton[tensorboard]' (or tensorboard)"
    return None


MISSING = _missing()


def _writer(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(run_dir) / LOG_FOLDER))


class EpochLog:
    """The per-epoch scalars of one run; ``add(record)`` with a metrics.jsonl record, ``close()`` at the end."""

    def __init__(self, run_dir: Path):
        self.writer = _writer(run_dir)

    def add(self, record: dict) -> None:
        w, step = self.writer, record["epoch"]
        w.add_scalar("loss/train", record["train_loss"], step)
        w.add_scalar("accuracy/train", record["train_acc"], step)
        w.add_scalar("accuracy/test", record["test_acc"], step)
        w.add_scalar("omega/train", record["train_omega"], step)
        w.add_scalar("omega/test", record["test_omega"], step)
        for i, omega in enumerate(record.get("test_omega_layers", []), start=1):
            w.add_scalar(f"omega_layer/{i}", omega, step)
        w.add_scalar("lr", record["lr"], step)
        w.flush()

    def close(self) -> None:
        self.writer.close()


def log_final(run_dir: Path, epoch: int, robustness: dict | None, diagnostics: list[dict] | None) -> None:
    """The end-of-run figures at step ``epoch`` (the last)."""
    w = _writer(run_dir)
    try:
        for name, value in (robustness or {}).get("accuracy", {}).items():
            w.add_scalar(f"robust_accuracy/{name}", value, epoch)
        for d in diagnostics or []:
            w.add_scalar(f"firing_rate/layer_{d['layer']}", d["firing_rate"], epoch)
            w.add_scalar(f"silent/layer_{d['layer']}", d["silent"], epoch)
    finally:
        w.close()
