"""train.py that sends itself a real SIGINT once step $STOP_AT_STEP's loss is read (train.StepLosses.read;
--log-every 1 reads every step's), so a test stops a run at an exact step rather than wherever a timed signal lands:

    STOP_AT_STEP=10 torchrun --nproc_per_node 2 tests/stop_at_step.py ARGS...   (ARGS: train.py's)

Every rank signals itself; the loop saves and stops before step STOP_AT_STEP + 1, as after a Ctrl-C. At the
end of an epoch the signal comes before dev evaluation and the epoch's checkpoint, which the loop then passes.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402  (after the path)
from lib.common import run_cli  # noqa: E402

STOP_AT = int(os.environ["STOP_AT_STEP"])
read = train.StepLosses.read


def read_then_signal(self, job, *args, **kwargs):
    read(self, job, *args, **kwargs)
    if job.state["step"] == STOP_AT:
        os.kill(os.getpid(), signal.SIGINT)


train.StepLosses.read = read_then_signal
run_cli(train.cli)
