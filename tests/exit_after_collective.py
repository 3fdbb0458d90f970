"""Run by tests/test_dist_exit.py under torchrun: a rank whose last act is `fitdist.dist.gather_objects`.

It keeps a reference to the default group, as DeepSpeed's engine does, so that tearing down cannot
join that group's gloo threads, then leaves the group and exits at once with status 0. `--plain`
gathers with torch's `all_gather_object` on the default group instead (the hazard itself)."""

import sys

import torch.distributed as tdist

from fitdist import dist

dist.setup("cpu")
held = tdist.group.WORLD
if sys.argv[1:] == ["--plain"]:
    gathered = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, "x" * 1000)
else:
    gathered = dist.gather_objects("x" * 1000)
assert gathered == ["x" * 1000] * tdist.get_world_size()
dist.teardown()
sys.exit(0)
