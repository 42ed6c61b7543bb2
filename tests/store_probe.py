"""A torch rank for the store tests: joins the group, all-reduces, reports, then maybe crashes.

Rank 1 exits 1 after its all-reduce on the first ``PROBE_CRASHES`` attempts. On the first
attempt both ranks then wait for a byte on the FIFO ``PROBE_GO``, so the test can look at what
listens while the group is up.
"""

import json
import os

import torch
import torch.distributed as dist

attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
print(json.dumps({"event": "step", "step": 1}), flush=True)  # progress: not a start-up failure
print(json.dumps({"event": "reduced", "sum": total.item(), "pid": os.getpid(),
                  "agent_store": os.environ.get("TORCHELASTIC_USE_AGENT_STORE")}), flush=True)
if attempt == 0:
    with open(os.environ["PROBE_GO"], "rb", buffering=0) as go:
        go.read(1)
os._exit(1 if rank == 1 and attempt < int(os.environ["PROBE_CRASHES"]) else 0)
