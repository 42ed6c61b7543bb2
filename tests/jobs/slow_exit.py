"""A job whose ranks take long to exit after their work is done, as on a loaded machine or in a
slow NCCL teardown: torch's static destructors have run, the interpreter is in its last steps.

``--exit-stall S``: after torch's destructors, each rank sleeps S seconds before it is gone
(``forever``: it never is). Before that, a few gloo all-reduces and one line from each rank.

    torchrun --nproc-per-node 2 tests/jobs/slow_exit.py --exit-stall 5
"""

import ctypes
import sys

# Registered before torch is loaded, so that it runs after torch's own exit handlers.
_libc = ctypes.CDLL(None)
_stall = sys.argv[sys.argv.index("--exit-stall") + 1] if "--exit-stall" in sys.argv else "0"
if _stall == "forever":
    _libc.__cxa_atexit(_libc.pause, None, None)
elif float(_stall) > 0:
    _libc.__cxa_atexit(_libc.sleep, ctypes.c_void_p(round(float(_stall))), None)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")
t = torch.ones(4)
for _ in range(20):
    dist.all_reduce(t)
print(f"rank {dist.get_rank()} done", flush=True)
dist.destroy_process_group()
