"""torchrun worker for tests/test_launch_preempt.py: rank 1 leaves at once
(as a crashed rank does); rank 0 is then signalled and asks whether to preempt."""

import os
import signal
import time

import torch.distributed as tdist

from fitdist import dist
from fitdist.preemption import PeersLost, PreemptionGuard

env = dist.setup("cpu", "gloo")
guard = PreemptionGuard(["SIGTERM"], every=2)
tdist.barrier()
if env.rank == 1:
    os._exit(0)  # no teardown: the peer just disappears
time.sleep(2)
with guard:
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested(1) is False  # not a check step: nothing asked, nothing decided
    try:
        guard.requested(2)
    except PeersLost as e:
        print(f"PEERS_LOST {e}", flush=True)
        os._exit(0)
print("NO_ERROR", flush=True)
os._exit(1)
