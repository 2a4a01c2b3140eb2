"""python -m train.run with a fault injected into one rank (tests/training/test_faults.py runs it under torchrun
or as processes started by hand).

FAULT=kill (SIGKILL) or stop (SIGSTOP: a rank that hangs), on rank FAULT_RANK when it reaches the
end of epoch FAULT_EPOCH, where every rank meets in a collective (the gathering of the RNG states
for the checkpoint).
"""

import os
import signal
import sys

import train.engine as engine
from train.run import main

FAULT = os.environ.get("FAULT", "")
FAULT_RANK = int(os.environ.get("FAULT_RANK", "1"))
FAULT_EPOCH = int(os.environ.get("FAULT_EPOCH", "2"))

_gather_rng = engine._gather_rng
_epochs = []


def _faulty_gather_rng(ctx):
    _epochs.append(1)
    if ctx.rank == FAULT_RANK and len(_epochs) == FAULT_EPOCH:
        if FAULT == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif FAULT == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
    return _gather_rng(ctx)


engine._gather_rng = _faulty_gather_rng

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
