"""Pipeline parallelism, simulated: where the bubbles of 1F1B, zero-bubble and DualPipe come from.

Concept (learning path: distributed training). A model cut into ``P`` stages runs on ``P`` ranks;
a batch is cut into micro-batches ("chunks") that flow through the stages. Each stage does, per
micro-batch, a forward ``F``, a backward for its input ``B`` (the gradient the previous stage is
waiting for) and a backward for its weights ``W`` (which nobody waits for). A rank that has nothing
it is allowed to run sits idle: that idle time inside the step is the *bubble*.

How it works: each schedule is written as the *program* of every rank, the order in which that rank
runs its work (this is what a real pipeline runtime executes). :func:`simulate` then runs all the
programs at once, starting every piece of work as soon as its rank is free and its inputs exist:

* ``F`` of micro-batch i on stage k needs ``F`` of i on stage k-1;
* ``B`` of i on stage k needs ``B`` of i on stage k+1 and its own ``F`` of i;
* ``W`` of i on stage k needs ``B`` of i on stage k; a rank runs one thing at a time.

Every number reported (total time, bubbles, memory) is read off the resulting timeline, never
from a formula; ``tests/test_pipeline_schedule.py`` checks them against the DeepSeek-V3 report's
Table 2. There ``B`` means the *full* backward, here ``backward_input + backward_weight``:

=========  ==========================  ==========  ===========
schedule   bubble per rank             parameters  activations
=========  ==========================  ==========  ===========
1f1b       (P-1)(F+B)                  1x          P
zb1p       (P-1)(F+B-2W)               1x          P
dualpipe   (P/2-1)(F&B+B-3W)           2x          P+1
=========  ==========================  ==========  ===========

Left out: communication time and its overlap (a send costs nothing here), memory bandwidth,
uneven stages (every stage takes the same F, B and W), and the optimizer step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SCHEDULES = ("1f1b", "zb1p", "dualpipe")


@dataclass(frozen=True)
class Task:
    """One piece of work: ``op`` ("F", "B" or "W") of one micro-batch on one pipeline stage.

    ``direction`` is 0 for micro-batches fed at rank 0; DualPipe also feeds micro-batches at the
    last rank (direction 1), whose stage k lives on rank P-1-k.
    """

    op: str
    microbatch: int
    stage: int
    direction: int = 0


@dataclass(frozen=True)
class Event:
    """What a rank ran from ``start`` to ``end``: one task, or for ``F&B`` an overlapped forward
    and full backward (its B and W) of two micro-batches of opposite directions."""

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
        """Idle time of each rank between time 0 and the end of the step (Table 2's bubble)."""
        return [self.total_time - b for b in self.busy]

    def to_dict(self) -> dict:
        return {"schedule": self.schedule, "stages": self.stages, "chunks": self.chunks, "times": self.times,
                "total_time": self.total_time, "bubble": self.bubble, "max_bubble": max(self.bubble),
                "parameter_memory": self.parameter_memory, "activation_memory": self.activation_memory,
                "events": [{"rank": e.rank, "kind": e.kind, "start": e.start, "end": e.end,
                            "tasks": [[t.op, t.microbatch, t.stage, t.direction] for t in e.tasks]}
                           for e in self.events]}


# --- the programs: what each rank runs, in order ---------------------------------------------------
# A program is a list of (kind, tasks) slots. A fused backward is the slot B followed directly by W.

def one_f_one_b(stages: int, chunks: int, rank: int, split_w: bool = False) -> list:
    """1F1B: P-rank-1 warm-up forwards, then alternate one forward and one backward, then drain the
    backwards. With ``split_w`` (ZB-H1) each W waits behind ``rank`` more backwards: the last rank,
    which 1F1B leaves holding one activation, delays most and fills its idle tail with W's, and no
    rank ever holds more than P activations (1F1B's peak, reached on rank 0)."""
    warmup = min(stages - rank - 1, chunks)
    delay = rank if split_w else 0
    order = [("F", i) for i in range(warmup)]
    for i in range(chunks - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", i) for i in range(chunks - warmup, chunks)]
    program, done_w = [], 0
    for op, i in order:
        program.append((op, (Task(op, i, rank),)))
        if op == "B" and i - done_w >= delay:  # W of the oldest micro-batch whose delay is served
            program.append(("W", (Task("W", done_w, rank),)))
            done_w += 1
    program += [("W", (Task("W", i, rank),)) for i in range(done_w, chunks)]
    return program


def dualpipe(stages: int, chunks: int, rank: int) -> list:
    """DualPipe (DeepSeek-V3 report §3.2.1, Figure 5), the eight phases of the reference schedule.

    Half the micro-batches enter at rank 0, half at the last rank, so rank r holds stage r of one
    copy of the model and stage P-1-r of the other. "near" is the direction whose first stage is
    nearer to rank r, "far" the other; h is the distance of rank r to the nearer end. In the middle
    phase every slot is a forward of one direction overlapped with a full backward of the other.
    """
    half, n = stages // 2, chunks // 2
    h = min(rank, stages - 1 - rank)
    near, far = (0, 1) if rank < half else (1, 0)
    next_f, next_b, deferred = [0, 0], [0, 0], deque()
    program = []

    def task(op, d):
        counter = next_f if op == "F" else next_b
        counter[d] += 1
        return Task(op, counter[d] - 1, rank if d == 0 else stages - 1 - rank, d)

    def forward(d):
        program.append(("F", (task("F", d),)))

    def backward(d, defer_w=False):  # B alone (its W queued for later) or the full backward B, W
        b = task("B", d)
        program.append(("B", (b,)))
        w = Task("W", b.microbatch, b.stage, d)
        deferred.append(w) if defer_w else program.append(("W", (w,)))

    def weight():  # the oldest queued W
        program.append(("W", (deferred.popleft(),)))

    def f_and_b(f_dir, b_dir):
        b = task("B", b_dir)
        program.append(("F&B", (task("F", f_dir), b, Task("W", b.microbatch, b.stage, b_dir))))

    for _ in range(2 * (half - h - 1)):  # 1: forwards of the near direction
        forward(near)
    for _ in range(h + 1):  # 2: both directions' forwards, alternating
        forward(near), forward(far)
    for _ in range(half - h - 1):  # 3: zero-bubble steps, a W fills the wait for the next forward
        backward(far, defer_w=True), weight(), forward(far)
    for i in range(n - stages + h + 1):  # 4: the steady state, all F&B
        if i == 0 and h == half - 1:  # middle ranks: not overlapped, the far backward goes out sooner
            forward(near), backward(far)
        else:
            f_and_b(near, far)
        f_and_b(far, near)
    for _ in range(half - h - 1):  # 5
        backward(far), f_and_b(far, near)
    for i in range(2 * (h + 1)):  # 6: the backwards drain; the second half defer their W
        backward(far if i % 2 == 0 else near, defer_w=i >= h + 1)
    for _ in range(half - h - 1):  # 7: the queued W's fill the waits for the last backwards
        weight(), backward(near, defer_w=True)
    while deferred:  # 8
        weight()
    return program


def programs(schedule: str, stages: int, chunks: int) -> list[list]:
    if schedule == "dualpipe":
        return [dualpipe(stages, chunks, r) for r in range(stages)]
    return [one_f_one_b(stages, chunks, r, split_w=schedule == "zb1p") for r in range(stages)]


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
    if stages < 1:
        raise ValueError(f"--stages {stages}: expected at least 1 pipeline stage")
    if schedule == "dualpipe" and (stages % 2 or chunks % 2 or chunks < 2 * stages):
        raise ValueError(f"dualpipe with --stages {stages} --chunks {chunks}: expected an even number of stages "
                         f"and an even number of chunks, at least 2 x stages (here {2 * stages + 2 * (stages % 2)}), "
                         "half fed from each end")
    if chunks < 1:
        raise ValueError(f"--chunks {chunks}: expected at least 1 micro-batch")
    for name, value in times.items():
        if not value >= 0:  # also refuses NaN
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected a time >= 0")


def simulate(schedule: str, stages: int, chunks: int, forward: float = 1.0, backward_input: float = 1.0,
             backward_weight: float = 1.0, overlap: float | None = None) -> Timeline:
    """Run ``schedule`` on ``stages`` ranks with ``chunks`` micro-batches and time every event.

    ``overlap`` is the time of DualPipe's F&B pair; by default ``forward + backward_input +
    backward_weight`` (nothing gained from overlapping; real kernels hide communication there).
    """
    if overlap is None:
        overlap = forward + backward_input + backward_weight
    times = {"forward": forward, "backward_input": backward_input, "backward_weight": backward_weight,
             "overlap": overlap}
    check_arguments(schedule, stages, chunks, times)
    duration = {"F": forward, "B": backward_input, "W": backward_weight, "F&B": overlap}
    todo = programs(schedule, stages, chunks)
    finished: dict[Task, float] = {}
    rank_free = [0.0] * stages
    position = [0] * stages
    events: list[Event] = []
    while any(position[r] < len(todo[r]) for r in range(stages)):
        progressed = False
        for r in range(stages):  # run each rank's program until it waits on work not yet timed
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
    timeline = Timeline(schedule, stages, chunks, times, events)
    measure(timeline)
    return timeline


def measure(timeline: Timeline) -> None:
    """Fill in total time, busy time, parameter and peak activation memory from the events alone."""
    ranks = range(timeline.stages)
    timeline.total_time = max(e.end for e in timeline.events)
    timeline.busy = [sum(e.end - e.start for e in timeline.events if e.rank == r) for r in ranks]
    # Parameters: how many distinct stages (model chunks) a rank computes, in stages' parameters.
    timeline.parameter_memory = [len({(t.stage, t.direction) for e in timeline.events if e.rank == r
                                      for t in e.tasks}) for r in ranks]
    # Activations: a forward's activations live from its start until its W ends. At equal times a
    # release comes first (0 sorts before 1): memory freed by one op is reused by the next.
    peaks = []
    for r in ranks:
        changes = sorted([(e.start, 1) for e in timeline.events if e.rank == r for t in e.tasks if t.op == "F"]
                         + [(e.end, 0) for e in timeline.events if e.rank == r for t in e.tasks if t.op == "W"])
        held = peak = 0
        for _, grows in changes:
            held += 1 if grows else -1
            peak = max(peak, held)
        peaks.append(peak)
    timeline.activation_memory = peaks


# --- the picture -------------------------------------------------------------------------------------

COLORS = {"F": "#7fb3e6", "B": "#8fd18f", "W": "#f2c46d", "F&B": "#c9a0dc"}


def plot_timeline(timeline: Timeline, path) -> None:
    """Rows are ranks, boxes are events labelled with their micro-batch; white is the bubble."""
    from matplotlib.patches import Patch

    from scratchlm.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(8.0, timeline.total_time * 0.28), 0.5 * timeline.stages + 1.6))
    for e in timeline.events:
        reverse = any(t.direction for t in e.tasks if t.op == e.kind[0])
        ax.barh(e.rank, e.end - e.start, left=e.start, height=0.8, color=COLORS[e.kind], edgecolor="black",
                linewidth=0.5, hatch="//" if reverse and e.kind != "F&B" else None)
        label = "/".join(str(t.microbatch) for t in e.tasks if t.op != "W") if e.kind == "F&B" else str(e.tasks[0].microbatch)
        ax.text((e.start + e.end) / 2, e.rank, label, ha="center", va="center", fontsize=7)
    ax.set_ylim(timeline.stages - 0.5, -0.5)
    ax.set_xlim(0, timeline.total_time)
    ax.set_yticks(range(timeline.stages), [f"rank {r}" for r in range(timeline.stages)])
    ax.set_xlabel("time")
    t = timeline.times
    ax.set_title(f"{timeline.schedule}: P={timeline.stages}, {timeline.chunks} micro-batches, F={t['forward']:g} "
                 f"B={t['backward_input']:g} W={t['backward_weight']:g}"
                 + (f" F&B={t['overlap']:g}" if timeline.schedule == "dualpipe" else "")
                 + f"; total {timeline.total_time:g}, bubble {max(timeline.bubble):g}")
    kinds = ["F", "B", "W"] + (["F&B"] if timeline.schedule == "dualpipe" else [])
    handles = [Patch(facecolor=COLORS[k], edgecolor="black", label=k) for k in kinds]
    if timeline.schedule == "dualpipe":
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="reverse direction"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(handles), fontsize=8)
    save_figure(fig, path)
