"""Pipeline parallelism, simulated: where the bubbles of 1F1B, zero-bubble and DualPipe come from.

Concept (learning path: distributed training). A model cut into ``P`` stages runs on ``P`` ranks,
and a batch cut into micro-batches ("chunks") flows through them. For each micro-batch, each stage
runs a forward ``F``, a backward for its input ``B`` (the gradient the previous stage is waiting
for) and a backward for its weights ``W`` (which nobody waits for). When a rank has nothing it may
run, it sits idle. That idle time inside the step is the *bubble*.

A schedule is written as one *program* per rank: the order in which that rank runs its work, which
is also what a real pipeline runtime executes. :func:`simulate` runs all the programs together.
Each piece of work starts as soon as its rank is free and its inputs exist:

* ``F`` of micro-batch i on stage k needs ``F`` of i on stage k-1;
* ``B`` of i on stage k needs ``B`` of i on stage k+1 and its own ``F`` of i;
* ``W`` of i on stage k needs ``B`` of i on stage k, and a rank runs one thing at a time.

A fused backward ("B+W", one autograd call) sends its input gradient only when it has finished.
Every number reported (time, bubbles, memory) is read off the timeline, not computed from a formula.
The DeepSeek-V3 report's Table 2 gives the per-rank bubbles below. In the table, ``B`` is the *full*
backward, ``backward_input + backward_weight`` here. The simulation reproduces each formula exactly
only under the stated condition (``tests/train/test_pipeline_schedule.py``; docs/pipeline-parallelism.md
explains the deviations):

=========  =================  ======  ===========  ====================================
schedule   bubble per rank    params  activations  exact when (Bi = backward_input)
=========  =================  ======  ===========  ====================================
1f1b       (P-1)(F+B)         1x      P            always (P activations: chunks >= P)
zb1p       (P-1)(F+B-2W)      1x      P            chunks >= P, W <= F and W <= Bi
dualpipe   (P/2-1)(F&B+B-3W)  2x      P+1          F = Bi, W <= F (the report's Figure 5)
=========  =================  ======  ===========  ====================================

Left out: communication time and its overlap (a send costs nothing here), memory bandwidth,
uneven stages (every stage takes the same F, B and W), and the optimizer step.

Three schedules and the simulator that reads bubbles and memory off their timelines share one
file (a little over 400 lines) so that the table above and the code that checks it sit together.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

SCHEDULES = ("1f1b", "zb1p", "dualpipe")


@dataclass(frozen=True)
class Task:
    """One piece of work: ``op`` ("F", "B" or "W") of micro-batch ``microbatch`` on ``stage``.

    ``direction`` is 0 for micro-batches fed in at rank 0. DualPipe also feeds micro-batches in at
    the last rank (direction 1, numbered after direction 0's), and their stage k lives on rank P-1-k.
    """

    op: str
    microbatch: int
    stage: int
    direction: int = 0


@dataclass(frozen=True)
class Event:
    """What ``rank`` ran from ``start`` to ``end``: "F", "B", "W", a fused "B+W", or "F&B" (a
    forward overlapped with a full backward of a micro-batch going the other way)."""

    rank: int
    kind: str
    start: float
    end: float
    tasks: tuple[Task, ...]


@dataclass
class Timeline:
    schedule: str
    stages: int
    chunks: int
    times: dict[str, float]
    events: list[Event]
    total_time: float = 0.0
    busy: list[float] = field(default_factory=list)
    parameter_memory: list[int] = field(default_factory=list)
    activation_memory: list[int] = field(default_factory=list)

    @property
    def bubble(self) -> list[float]:
        """Idle time of each rank between the step's start and its end (Table 2's bubble)."""
        return [self.total_time - b for b in self.busy]

    def to_dict(self, events: bool = True) -> dict:
        out = {
            "schedule": self.schedule,
            "stages": self.stages,
            "chunks": self.chunks,
            "times": self.times,
            "total_time": self.total_time,
            "bubble": self.bubble,
            "max_bubble": max(self.bubble),
            "table2_bubble": table2_bubble(self.schedule, self.stages, **self.times),
            "table2_conditions_hold": table2_conditions_hold(
                self.schedule, self.stages, self.chunks, **self.times
            ),
            "parameter_memory": self.parameter_memory,
            "activation_memory": self.activation_memory,
        }
        if events:
            out["events"] = [
                {
                    "rank": e.rank,
                    "kind": e.kind,
                    "start": e.start,
                    "end": e.end,
                    "tasks": [[t.op, t.microbatch, t.stage, t.direction] for t in e.tasks],
                }
                for e in self.events
            ]
        return out


def table2_bubble(
    schedule: str,
    stages: int,
    forward: float,
    backward_input: float,
    backward_weight: float,
    overlap: float | None = None,
) -> float:
    """The DeepSeek-V3 report's Table 2 formula (its B is the full backward), to compare with."""
    P, F, B, W = stages, forward, backward_input + backward_weight, backward_weight
    if schedule == "dualpipe":
        return (P / 2 - 1) * ((F + B if overlap is None else overlap) + B - 3 * W)
    return (P - 1) * (F + B - (2 * W if schedule == "zb1p" else 0))


def table2_conditions_hold(
    schedule: str,
    stages: int,
    chunks: int,
    forward: float,
    backward_input: float,
    backward_weight: float,
    overlap: float | None = None,
) -> bool:
    """Whether the simulated schedule is one Table 2's formula describes exactly (docs: conditions):
    1F1B always; ZB1P with chunks >= P and W <= F, W <= B; DualPipe with F = B and W <= F (B: the
    backward for inputs)."""
    F, Bi, W = forward, backward_input, backward_weight
    if schedule == "1f1b":
        return True
    if schedule == "zb1p":
        return chunks >= stages and W <= F and Bi >= W
    return math.isclose(F, Bi) and W <= F


# --- the programs: what each rank runs, in order ---------------------------------------------------
# A program is a list of slots (kind, tasks); a slot with several tasks runs them as one event.


def one_f_one_b(stages: int, chunks: int, rank: int, split_w: bool = False) -> list:
    """1F1B: P-rank-1 warm-up forwards, then one forward and one backward in turn, then the last
    backwards. With ``split_w`` (ZB-H1, the zero-bubble paper's schedule with 1F1B's memory) the
    backward is split: B is sent on at once, and rank r runs each W ``r`` backwards later. The last
    rank, which 1F1B leaves holding 1 activation, delays the most and fills its idle tail with W's;
    every rank then holds at most P activations, 1F1B's peak on rank 0."""
    warmup = min(stages - rank - 1, chunks)
    delay = rank if split_w else 0
    order = [("F", i) for i in range(warmup)]
    for i in range(chunks - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", i) for i in range(chunks - warmup, chunks)]
    program, next_w = [], 0
    for op, i in order:
        if op == "F":
            program.append(("F", (Task("F", i, rank),)))
        elif not split_w:
            program.append(("B+W", (Task("B", i, rank), Task("W", i, rank))))
        else:
            program.append(("B", (Task("B", i, rank),)))
            if i - next_w >= delay:  # the oldest W whose delay is served
                program.append(("W", (Task("W", next_w, rank),)))
                next_w += 1
    if split_w:
        program += [("W", (Task("W", i, rank),)) for i in range(next_w, chunks)]
    return program


def dualpipe(stages: int, chunks: int, rank: int) -> list:
    """DualPipe (DeepSeek-V3 report, section 3.2.1 and Figure 5): the eight phases of the reference schedule.

    Half the micro-batches enter at rank 0 and half at the last rank, so rank r holds stage r of
    one copy of the model and stage P-1-r of the other. "near" is the direction whose entry is the
    closer end to rank r, "far" the other one, and h is rank r's distance to that end. In the middle
    phase every slot is a forward of one direction overlapped with a full backward of the other.
    """
    half, n = stages // 2, chunks // 2
    h = min(rank, stages - 1 - rank)
    near, far = (0, 1) if rank < half else (1, 0)
    next_f, next_b, deferred, program = [0, 0], [0, 0], deque(), []

    def task(op, d):  # the next micro-batch of direction d for this op, in order
        counter = next_f if op == "F" else next_b
        counter[d] += 1
        return Task(op, counter[d] - 1 + n * d, rank if d == 0 else stages - 1 - rank, d)

    def forward(d):
        program.append(("F", (task("F", d),)))

    def backward(d, defer_w=False):  # the full backward B+W, or B alone with its W queued
        b = task("B", d)
        w = Task("W", b.microbatch, b.stage, d)
        if defer_w:
            program.append(("B", (b,)))
            deferred.append(w)
        else:
            program.append(("B+W", (b, w)))

    def weight():  # the oldest queued W
        program.append(("W", (deferred.popleft(),)))

    def f_and_b(f_dir, b_dir):
        b = task("B", b_dir)
        program.append(("F&B", (task("F", f_dir), b, Task("W", b.microbatch, b.stage, b_dir))))

    for _ in range(2 * (half - h - 1)):  # 1: forwards of the near direction
        forward(near)
    for _ in range(h + 1):  # 2: forwards of both directions, in turn
        forward(near), forward(far)
    for _ in range(half - h - 1):  # 3: zero-bubble: a W fills the wait for the next far forward
        backward(far, defer_w=True), weight(), forward(far)
    for i in range(n - stages + h + 1):  # 4: the steady state, all F&B
        if i == 0 and h == half - 1:  # the middle ranks send their first far gradient sooner
            forward(near), backward(far)
        else:
            f_and_b(near, far)
        f_and_b(far, near)
    for _ in range(half - h - 1):  # 5
        backward(far), f_and_b(far, near)
    for i in range(2 * (h + 1)):  # 6: the backwards drain, the second half with their W queued
        backward(far if i % 2 == 0 else near, defer_w=i >= h + 1)
    for _ in range(half - h - 1):  # 7: the queued W's fill the waits for the last backwards
        weight(), backward(near, defer_w=True)
    while deferred:  # 8
        weight()
    return program


# --- the simulator -----------------------------------------------------------------------------------


def dependencies(task: Task, stages: int) -> list[Task]:
    """The tasks that must have finished before ``task`` may start."""
    i, k, d = task.microbatch, task.stage, task.direction
    if task.op == "F":
        return [Task("F", i, k - 1, d)] if k > 0 else []
    if task.op == "B":
        return [Task("F", i, k, d)] + ([Task("B", i, k + 1, d)] if k < stages - 1 else [])
    return [Task("B", i, k, d)]


def check_arguments(schedule: str, stages: int, chunks: int, times: dict[str, float]) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if stages < 1 or chunks < 1:
        raise ValueError(f"--stages {stages} --chunks {chunks}: expected at least 1 stage and 1 micro-batch")
    if schedule == "dualpipe" and (stages % 2 or chunks % 2 or chunks < 2 * stages):
        raise ValueError(
            f"dualpipe with --stages {stages} --chunks {chunks}: expected an even number of stages "
            f"and an even number of chunks, at least 2 x stages = {2 * stages} (half enter at each end)"
        )
    for name, value in times.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected a finite time >= 0")
    if not times.get("forward", 0) + times.get("backward_input", 0) + times.get("backward_weight", 0) > 0:
        raise ValueError(
            "--forward, --backward-input and --backward-weight are all 0: give the work some duration"
        )


def simulate(
    schedule: str,
    stages: int,
    chunks: int,
    forward: float = 1.0,
    backward_input: float = 1.0,
    backward_weight: float = 1.0,
    overlap: float | None = None,
) -> Timeline:
    """Run ``schedule`` on ``stages`` ranks with ``chunks`` micro-batches and time every event.

    ``overlap`` is the time of DualPipe's F&B pair (a forward and a full backward). By default it
    is ``forward + backward_input + backward_weight``: the pair gains nothing from running together.
    In a real system it hides the communication of each half behind the other's computation.
    """
    times = {
        "forward": forward,
        "backward_input": backward_input,
        "backward_weight": backward_weight,
        "overlap": overlap,
    }
    check_arguments(schedule, stages, chunks, times)
    if overlap is not None and schedule != "dualpipe":
        raise ValueError(f"--overlap is the time of DualPipe's F&B pair; {schedule} has none")
    full_backward = backward_input + backward_weight
    if schedule == "dualpipe":
        if overlap is None:
            overlap = times["overlap"] = forward + full_backward
        if overlap < max(forward, full_backward):
            raise ValueError(
                f"--overlap {overlap}: expected at least max(F, B+W) = {max(forward, full_backward)}: "
                "a forward and a full backward run together take at least as long as the longer one"
            )
    duration = {"F": forward, "B": backward_input, "W": backward_weight, "B+W": full_backward, "F&B": overlap}

    todo = [
        dualpipe(stages, chunks, r)
        if schedule == "dualpipe"
        else one_f_one_b(stages, chunks, r, split_w=schedule == "zb1p")
        for r in range(stages)
    ]
    finished: dict[Task, float] = {}
    rank_free, position, events = [0.0] * stages, [0] * stages, []
    while any(position[r] < len(todo[r]) for r in range(stages)):
        progressed = False
        for r in range(stages):  # run each rank's program until it waits on work not yet done
            while position[r] < len(todo[r]):
                kind, tasks = todo[r][position[r]]
                needed = [d for t in tasks for d in dependencies(t, stages) if d not in tasks]
                if any(d not in finished for d in needed):
                    break
                start = max([rank_free[r]] + [finished[d] for d in needed])
                end = start + duration[kind]
                events.append(Event(r, kind, start, end, tasks))
                finished.update((t, end) for t in tasks)
                rank_free[r], position[r], progressed = end, position[r] + 1, True
        if not progressed:
            raise RuntimeError(f"{schedule}: deadlock, every rank waits on work that never comes")
    events.sort(key=lambda e: (e.rank, e.start))
    return measure(Timeline(schedule, stages, chunks, times, events))


def measure(timeline: Timeline) -> Timeline:
    """Fill in total time, busy time, parameter and peak activation memory from the events alone."""
    per_rank = [[e for e in timeline.events if e.rank == r] for r in range(timeline.stages)]
    timeline.total_time = max(e.end for e in timeline.events)
    timeline.busy = [sum(e.end - e.start for e in events) for events in per_rank]
    # Parameters: the distinct stages (model chunks) a rank computes, in units of one stage.
    timeline.parameter_memory = [
        len({(t.stage, t.direction) for e in events for t in e.tasks}) for events in per_rank
    ]
    # Activations: a micro-batch's activations live from the start of its F to the end of its W.
    # At equal times a release (0) sorts before a new forward (1): freed memory is reused at once.
    timeline.activation_memory = []
    for events in per_rank:
        changes = sorted(
            [(e.start, 1) for e in events for t in e.tasks if t.op == "F"]
            + [(e.end, 0) for e in events for t in e.tasks if t.op == "W"]
        )
        held = peak = 0
        for _, grows in changes:
            held += 1 if grows else -1
            peak = max(peak, held)
        timeline.activation_memory.append(peak)
    return timeline


# --- the picture -------------------------------------------------------------------------------------

COLORS = {"F": "#f4a93b", "B": "#7bcf5a", "W": "#66b3e8"}


def plot_timeline(timeline: Timeline, path) -> None:
    """Rows are ranks and boxes are work, labelled with micro-batch numbers; white is the bubble.
    A fused B+W is drawn as its two parts, and an F&B as a box whose top half is the forward."""
    from matplotlib.patches import Patch

    from scratchlm.plots import pyplot, save_figure

    plt = pyplot()
    t, T = timeline.times, timeline.total_time
    fig, ax = plt.subplots(figsize=(min(24.0, max(8.0, 0.22 * T)), 0.45 * timeline.stages + 1.5))

    def box(rank, start, length, op, label, y=0.0, height=0.84):
        ax.barh(
            rank + y, length, left=start, height=height, color=COLORS[op], edgecolor="black", linewidth=0.5
        )
        ax.text(start + length / 2, rank + y, label, ha="center", va="center", fontsize=6)

    for e in timeline.events:
        task = {x.op: x for x in e.tasks}
        if e.kind == "F&B":
            box(e.rank, e.start, e.end - e.start, "F", task["F"].microbatch, -0.21, 0.42)
            box(e.rank, e.start, e.end - e.start, "B", task["B"].microbatch, 0.21, 0.42)
        elif e.kind == "B+W":
            box(e.rank, e.start, t["backward_input"], "B", task["B"].microbatch)
            box(e.rank, e.start + t["backward_input"], t["backward_weight"], "W", task["W"].microbatch)
        else:
            box(e.rank, e.start, e.end - e.start, e.kind, e.tasks[0].microbatch)
    ax.set_ylim(timeline.stages - 0.5, -0.5)
    ax.set_xlim(0, T)
    ax.set_yticks(range(timeline.stages), [f"rank {r}" for r in range(timeline.stages)])
    ax.set_xlabel("time")
    overlap = f", F&B={t['overlap']:g}" if timeline.schedule == "dualpipe" else ""
    ax.set_title(
        f"{timeline.schedule}: {timeline.stages} stages, {timeline.chunks} micro-batches, "
        f"F={t['forward']:g} B={t['backward_input']:g} W={t['backward_weight']:g}{overlap}: "
        f"total {T:g}, bubble per rank {max(timeline.bubble):g}",
        fontsize=9,
    )
    names = {"F": "forward F", "B": "backward for input B", "W": "backward for weights W"}
    handles = [Patch(facecolor=COLORS[k], edgecolor="black", label=names[k]) for k in names]
    if timeline.schedule == "dualpipe":
        handles.append(
            Patch(facecolor="white", edgecolor="black", label="F&B: top F, bottom B+W, overlapped")
        )
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.15),
        ncol=len(handles),
        fontsize=7,
        frameon=False,
    )
    save_figure(fig, path)
