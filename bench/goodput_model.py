"""18. What it buys at scale, on paper: effective training time at 1,024, 16,384 and 100,000 GPUs.

Nothing is run: the model reads this suite's own measurements (``bench/results/``) and the
published failure rates, and says every assumption (:data:`ASSUMED`). For each launcher, a
failure costs the job

    downtime = detection + teardown + rendezvous(nodes) + relaunch + load
    lost     = the work since the last checkpoint the job resumes from

and the periodic checkpoint costs ``stall`` each interval ``tau``. With a mean time to failure
``M``, the fraction of wall time that trains (Young's first-order model, failures far apart
compared with the downtime) is

    goodput = 1 - stall / tau - (downtime + lost) / M,    lost = (1 - jit) * tau / 2

where ``jit`` is the share of failures after which the survivors save the last step just in
time (ours: a rank's crash, its peers alive; torchrun: none), and each launcher takes its own
best interval, ``tau = sqrt(2 * stall * M / (1 - jit))`` (Young), at most ``M``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .report import Result, Summary, Table

NAME = "goodput_model"
RESULTS = Path(__file__).parent / "results"

# Kokolis et al., "Revisiting Reliability in Large-Scale Machine Learning Research Clusters"
# (Meta, 2024): mean time to failure of 7.9 h for 1,024-GPU jobs and 1.8 h for 16,384-GPU jobs.
# 100,000 GPUs: the 16,384 rate scaled by the GPU count (assumed: failures independent, per GPU).
MTTF_H = {1024: 7.9, 16384: 1.8, 100_000: 1.8 * 16384 / 100_000}
ASSUMED = {
    "gpus_per_node": 8,  # one daemon (or torchrun agent) per 8-GPU node
    "load_s": 30.0,  # reading the checkpoint back: the job's and the file system's, the same for both
    "stall_s": 10.0,  # a periodic checkpoint blocks training this long (async savers: less)
    "jit_share": 0.5,  # failures after which the peers live to save the last step (process
                       # crashes, software faults; not a lost node whose shards have no replica)
}


@dataclass(frozen=True)
class Phases:
    """One launcher's measured costs of a failure, in seconds (the rendezvous a function of nodes)."""

    name: str
    detection: float
    teardown: float
    relaunch: float
    rendezvous: dict[int, float]  # nodes: seconds from the failure's news to the next round, measured
    store_cpu: dict[int, float]  # nodes: the store's CPU seconds per re-round, measured
    jit: float  # the share of failures whose last step is saved just in time

    def round_at(self, nodes: int) -> tuple[float, bool]:
        """The next round's time at ``nodes``: measured, or (True) extrapolated beyond the largest
        measured count by the growth of the store's own work, the one serial part (the simulated
        nodes' wall time also holds all their CPU on 2 cores, which real nodes do not share):
        ``t(n) + c(n) * ((nodes / n) ** s - 1)``, ``s`` its exponent between the two largest counts."""
        if nodes in self.rendezvous:
            return self.rendezvous[nodes], False
        (n1, c1), (n2, c2) = sorted(self.store_cpu.items())[-2:]
        slope = math.log(c2 / c1) / math.log(n2 / n1) if c1 > 0 and c2 > 0 else 2.0
        return self.rendezvous[n2] + c2 * ((nodes / n2) ** slope - 1), True


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def goodput(p: Phases, gpus: int) -> dict[str, float | bool]:
    mttf = MTTF_H[gpus] * 3600
    nodes = gpus // ASSUMED["gpus_per_node"]
    rdzv, extrapolated = p.round_at(nodes)
    downtime = p.detection + p.teardown + rdzv + p.relaunch + ASSUMED["load_s"]
    stall = ASSUMED["stall_s"]
    tau = min(math.sqrt(2 * stall * mttf / (1 - p.jit)) if p.jit < 1 else mttf, mttf)
    lost = (1 - p.jit) * tau / 2
    return {"nodes": nodes, "mttf_h": MTTF_H[gpus], "rdzv_s": rdzv, "extrapolated": extrapolated,
            "downtime_s": downtime, "tau_s": tau, "lost_s": lost,
            "goodput": 1 - stall / tau - (downtime + lost) / mttf}


def _median(runs: list[dict], key: str) -> float:
    return Summary.of([r[key] for r in runs]).median


def rounds(rdzv: dict, side: str, key: str) -> dict[int, float]:
    """``key``'s median at each simulated node count (``rdzv_load``). Torch's side is its
    handler at torchrun's pace with its event naming made cheap ("torch-named"): as shipped it
    starved at 128 simulated nodes on 2 cores, a cost of the simulation, not of its pace."""
    return {n: rdzv[f"{side}@{n}"][key]["median"] for n in rdzv["sizes"]
            if key in rdzv.get(f"{side}@{n}", {})}


def measured() -> tuple[Phases, Phases]:
    """Each launcher's phases from this suite's results: detection and teardown at the most
    ranks both ran (``ranks``), the relaunch to the first step at 4 ranks less its teardown
    (``recovery``: ours warm, torchrun tuned and cold), the next round at N nodes (``rdzv_load``)."""
    ranks, recovery, rdzv = _load("ranks")["data"], _load("recovery")["data"], _load("rdzv_load")["data"]
    size = max(int(k.split()[-1]) for k in ranks if k.startswith("ours ") and ranks[k].get("kills"))
    phases = []
    for name, launcher, relaunched, side in (("ours", "ours", "ours", "ours"),
                                             ("torchrun", "torchrun default", "torchrun tuned", "torch-named")):
        kills = ranks[f"{launcher} {size}"]["kills"]
        rec = recovery[f"4_workers/{relaunched}"]
        phases.append(Phases(name, _median(kills, "detection_s"), _median(kills, "teardown_s"),
                             rec["recovery_s"]["median"] - rec["stages_s"]["old_group_gone"]["median"],
                             rounds(rdzv, side, "next_round_s"), rounds(rdzv, side, "reround_store_cpu_s"),
                             ASSUMED["jit_share"] if name == "ours" else 0.0))
    return phases[0], phases[1]


async def run(quick: bool) -> Result:
    ours, torchrun = measured()
    table = Table("Effective training time, modelled from measured phases and published failure rates",
                  ["GPUs", "nodes", "MTTF h", "launcher", "rendezvous s", "downtime s", "interval min",
                   "lost s", "goodput", "ours − torchrun"])
    data: dict[str, object] = {"assumed": ASSUMED, "mttf_h": MTTF_H,
                               "phases": {p.name: vars(p) for p in (ours, torchrun)}}
    for gpus in MTTF_H:
        rows = {p.name: goodput(p, gpus) for p in (ours, torchrun)}
        data[str(gpus)] = rows
        for p in (ours, torchrun):
            g = rows[p.name]
            gain = g["goodput"] - rows[torchrun.name]["goodput"] if p is ours else None
            table.add(f"{gpus:,}", f"{g['nodes']:,}", f"{g['mttf_h']:.2f}", p.name,
                      f"{g['rdzv_s']:.2f}{'*' if g['extrapolated'] else ''}", f"{g['downtime_s']:.1f}",
                      f"{g['tau_s'] / 60:.0f}", f"{g['lost_s']:.0f}", f"{g['goodput']:.4f}",
                      f"{gain:+.4f}" if gain is not None else "")
    table.notes.append("* extrapolated past 128 nodes by the growth of the store's CPU per re-round "
                       "(Phases.round_at). Assumed: "
                       + ", ".join(f"{k} {v}" for k, v in ASSUMED.items()) + ".")
    return Result(NAME, [table], data)
