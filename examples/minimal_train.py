"""A torchrun-style training script that cooperates fully with supervisord-ft.

Runs unchanged under `torchrun` too. The four things a script needs (see README, "The worker
contract"): resume from SUPERVISORD_FT_RESUME_FROM, write checkpoints atomically under the
supervisor's naming, stop at a step boundary on SIGTERM, report progress as JSON lines. Two
more make checkpoints cheap: periodic saves written in the background (AsyncCheckpointer), and
a just-in-time save of the last completed step when a peer dies (SaveOnFailure), so a crash
costs no completed step.

    supervisord-ft run --num-workers 2 -- python examples/minimal_train.py --steps 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from supervisord_ft_worker.async_checkpoint import AsyncCheckpointer
from supervisord_ft_worker.checkpoint import load_checkpoint
from supervisord_ft_worker.contract import CheckpointRequest, SaveOnFailure, StopFlag, SupervisorEnv, emit, report_progress


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    args = parser.parse_args()

    env = SupervisorEnv.from_env()
    stop = StopFlag().install()  # first SIGTERM: finish this step, save, exit 0
    save_now = CheckpointRequest().install()  # SIGUSR1/2: save at the next step, keep training
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step = 0
    if env.resume_from is not None:  # set by the supervisor when a checkpoint exists
        saved = load_checkpoint(env.resume_from)  # verified (zip CRCs) before it is unpickled
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        step = saved["step"]

    ckpt = AsyncCheckpointer(env.checkpoint_dir or Path("checkpoints"))

    def state() -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}

    # A collective fails when a peer dies, before this step's update: save the last completed step, exit 1.
    on_failure = SaveOnFailure(lambda: ckpt.save_now(state(), step))
    while step < args.steps:
        g = torch.Generator().manual_seed(step * env.world_size + env.rank)
        x = torch.randn(16, 8, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        with on_failure:
            for p in model.parameters():
                dist.all_reduce(p.grad)
        for p in model.parameters():
            p.grad /= env.world_size
        opt.step()
        step += 1
        report_progress(step, loss=loss.item())  # {"event": "step", ...}: the hang watchdog's progress
        # Every rank must agree to stop (or save) at the same step, or peers block in the next
        # collective: one all_reduce carries both votes.
        votes = torch.tensor([float(stop.requested), float(save_now.take())])
        with on_failure:
            dist.all_reduce(votes)
        stopping, asked = votes.tolist()
        if env.rank == 0 and (step % args.checkpoint_every == 0 or stopping > 0 or asked > 0):
            ckpt.save(state(), step)  # a snapshot; written in the background, named once complete
        if stopping > 0:
            emit("stopped", step=step)
            break
    ckpt.wait()  # the last save is durable before exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
