"""Pipeline schedules: the simulated timelines are valid schedules, and their bubbles and memory match
the DeepSeek-V3 report's Table 2 (1F1B, ZB1P, DualPipe) inside the conditions where it holds."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from scratchlm.cli import main
from scratchlm.train.pipeline_schedule import plot_timeline, simulate

# (F, B, W): B is the backward for inputs here; Table 2's B is the full backward B + W.
TIMES = [(1, 1, 1), (1, 2, 1), (2, 3, 1), (1, 1, 0.5), (2, 2, 1.5), (1, 3, 2), (3, 1, 0.25), (1, 1, 0)]


def table2(schedule, P, F, B, W, overlap=None):
    full = B + W
    return {
        "1f1b": (P - 1) * (F + full),
        "zb1p": (P - 1) * (F + full - 2 * W),
        "dualpipe": (P / 2 - 1) * ((F + full if overlap is None else overlap) + full - 3 * W),
    }[schedule]


def check_valid(t):
    """An independent check of the timeline: every piece of work once, on its rank, for its time, one
    thing at a time per rank, and no work before the work it needs (from the events alone)."""
    P, C, times = t.stages, t.chunks, t.times
    done = {}
    for e in t.events:
        for task in e.tasks:
            key = (task.op, task.microbatch, task.stage)
            assert key not in done, f"{key} runs twice"
            done[key] = e
            assert e.rank == (task.stage if task.direction == 0 else P - 1 - task.stage)
            assert task.direction == (task.microbatch >= C // 2 if t.schedule == "dualpipe" else 0)
        ops = sorted(task.op for task in e.tasks)
        length = {"F": times["forward"], "B": times["backward_input"], "W": times["backward_weight"]}
        expected = {
            ("F",): length["F"],
            ("B",): length["B"],
            ("W",): length["W"],
            ("B", "W"): length["B"] + length["W"],
            ("B", "F", "W"): times["overlap"],
        }[tuple(ops)]
        assert e.end - e.start == pytest.approx(expected)
    assert set(done) == {(op, i, k) for op in "FBW" for i in range(C) for k in range(P)}
    for r in range(P):
        mine = sorted((e for e in t.events if e.rank == r), key=lambda e: e.start)
        assert mine[0].start >= 0
        for a, b in itertools.pairwise(mine):
            assert b.start >= a.end - 1e-9, f"rank {r}: {a} overlaps {b}"
    for (op, i, k), e in done.items():
        needs = {
            "F": [("F", i, k - 1)] if k > 0 else [],
            "B": [("F", i, k)] + ([("B", i, k + 1)] if k < P - 1 else []),
            "W": [("B", i, k)],
        }[op]
        for need in needs:
            before = done[need]
            if before is e:  # inside one event: only a fused or overlapped backward's W after its B
                assert op == "W" and need[0] == "B"
            else:
                assert e.start >= before.end - 1e-9, f"{(op, i, k)} starts before {need} ends"


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe"])
def test_timelines_are_valid_schedules(schedule):
    for P, (F, B, W) in itertools.product([2, 4, 6, 8], TIMES):
        for C in [2 * P, 2 * P + 4] if schedule == "dualpipe" else [1, P - 1, P, 2 * P + 1]:
            check_valid(simulate(schedule, P, C, F, B, W))
    check_valid(simulate("dualpipe", 6, 14, 1, 2, 0.5, overlap=2.75))


def test_1f1b_matches_table2_for_any_times():
    for P, (F, B, W) in itertools.product([1, 2, 3, 4, 8], TIMES):
        for C in [1, P, 2 * P + 1]:
            t = simulate("1f1b", P, C, F, B, W)
            assert t.bubble == pytest.approx([table2("1f1b", P, F, B, W)] * P)
            assert t.total_time == pytest.approx((C + P - 1) * (F + B + W))
            assert t.parameter_memory == [1] * P
            assert t.activation_memory == [min(P - r, C) for r in range(P)]  # peak P on the first stage


def test_zb1p_matches_table2_when_w_fits_the_gaps():
    """Inside W <= F and W <= B (the gaps W fills are one F or one B long) with chunks >= P."""
    cases = 0
    for P, (F, B, W) in itertools.product([2, 3, 4, 8], TIMES):
        if min(F, B) < W:
            continue
        for C in [P, 2 * P + 1]:
            t = simulate("zb1p", P, C, F, B, W)
            assert t.bubble == pytest.approx([table2("zb1p", P, F, B, W)] * P)
            assert t.parameter_memory == [1] * P
            assert t.activation_memory == [P] * P  # every rank at 1F1B's peak, never above it
            cases += 1
    assert cases >= 40


def test_zb1p_outside_the_condition_a_long_w_fills_only_its_gap():
    for P, (F, B, W) in itertools.product([2, 4, 8], [(1, 3, 2), (0.5, 0.25, 0.5), (1, 1, 2), (2, 1, 1.5)]):
        t = simulate("zb1p", P, 2 * P, F, B, W)
        assert t.bubble == pytest.approx([(P - 1) * (F + B - min(F, B, W))] * P)
        assert max(t.bubble) > table2("zb1p", P, F, B, W)


def test_dualpipe_matches_table2_with_figure5_times():
    """F = B (as Figure 5 draws them) and W <= F: the max over ranks is Table 2's bubble; with no
    gain from overlapping (F&B = F + B + W) every rank has exactly that bubble."""
    for P, (F, W), C in itertools.product(
        [2, 4, 6, 8], [(1, 1), (1, 0.5), (2, 1.5), (1, 0), (3, 0.25)], [16, 20]
    ):
        B = F
        for overlap in [None, F + B + W - 0.5 * min(F, B + W)]:
            t = simulate("dualpipe", P, C, F, B, W, overlap)
            expected = table2("dualpipe", P, F, B, W, overlap)
            assert max(t.bubble) == pytest.approx(expected)
            if overlap is None:
                assert t.bubble == pytest.approx([expected] * P)
            assert t.parameter_memory == [2] * P
            assert t.activation_memory[0] == max(t.activation_memory) == P + 1


def test_dualpipe_with_forward_and_backward_unequal_departs_from_table2():
    """When F != B the gaps Figure 5 draws one cell wide are waits for a forward (F long), not for a
    backward (B long): with F >= B the bubble is (P/2-1)(F&B + F - 2W), and with B > F Table 2 only
    bounds it from above."""
    for P, (F, B, W) in itertools.product([4, 6, 8], [(2, 1, 1), (3, 1, 1), (2, 1, 0.5), (3, 2, 1)]):
        for overlap in [None, F + B + W - 0.5]:
            t = simulate("dualpipe", P, 2 * P, F, B, W, overlap)
            fb = t.times["overlap"]
            assert max(t.bubble) == pytest.approx((P / 2 - 1) * (fb + F - 2 * W))
            assert max(t.bubble) > table2("dualpipe", P, F, B, W, fb)
    for P, (F, B, W) in itertools.product([4, 6, 8], [(1, 2, 1), (1, 3, 1), (2, 3, 1), (1, 1.5, 0.5)]):
        t = simulate("dualpipe", P, 2 * P + 2, F, B, W)
        assert max(t.bubble) < table2("dualpipe", P, F, B, W)
    assert max(simulate("dualpipe", 8, 16, 1, 2, 1).bubble) == 11 and table2("dualpipe", 8, 1, 2, 1) == 12


@pytest.mark.parametrize(
    "args, message",
    [
        (("dualpipe", 7, 20), "even number of stages"),
        (("dualpipe", 8, 14), "at least 2 x stages = 16"),
        (("dualpipe", 4, 9), "even number of chunks"),
        (("1f1b", 4, 0), "at least 1 stage and 1 micro-batch"),
        (("pipedream", 4, 8), "expected one of 1f1b, zb1p, dualpipe"),
    ],
)
def test_bad_shapes_say_what_was_expected(args, message):
    with pytest.raises(ValueError, match=message):
        simulate(*args)


def test_bad_times_say_what_was_expected():
    with pytest.raises(ValueError, match="--backward-weight -1: expected a finite time >= 0"):
        simulate("zb1p", 4, 8, backward_weight=-1)
    with pytest.raises(ValueError, match="--forward nan"):
        simulate("1f1b", 4, 8, forward=math.nan)
    with pytest.raises(ValueError, match="1f1b has none"):
        simulate("1f1b", 4, 8, overlap=2.0)
    with pytest.raises(ValueError, match=r"at least max\(F, B\+W\) = 2"):
        simulate("dualpipe", 4, 8, overlap=1.5)


def test_to_dict_is_json_and_plot_is_a_png(tmp_path):
    t = simulate("dualpipe", 4, 10, 1, 1, 0.5, overlap=2.0)
    d = json.loads(json.dumps(t.to_dict()))
    assert d["max_bubble"] == max(t.bubble) and len(d["events"]) == len(t.events)
    assert d["parameter_memory"] == [2] * 4 and d["activation_memory"] == [5] * 4
    plot_timeline(t, tmp_path / "dualpipe.png")
    assert (tmp_path / "dualpipe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["dualpipe.png"]  # written atomically, no temporary left


def test_cli_parallel_simulate(tmp_path, capsys):
    plot = tmp_path / "zb1p.png"
    assert (
        main(
            [
                "parallel",
                "simulate",
                "--schedule",
                "zb1p",
                "--stages",
                "4",
                "--chunks",
                "8",
                "--backward-input",
                "2",
                "--backward-weight",
                "0.5",
                "--plot",
                str(plot),
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["bubble"] == [7.5] * 4 == [report["table2_bubble"]] * 4  # 3 x (1 + 2.5 - 1)
    assert report["activation_memory"] == [4] * 4 and "events" not in report
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["parallel", "simulate", "--schedule", "1f1b", "--stages", "4", "--chunks", "8"]) == 0
    assert "bubble per rank (max): 9; DeepSeek-V3 Table 2 formula: 9" in capsys.readouterr().out
    assert main(["parallel", "simulate", "--schedule", "dualpipe", "--stages", "5", "--chunks", "10"]) == 2
    assert "expected an even number of stages" in capsys.readouterr().err
    assert (
        main(
            [
                "parallel",
                "simulate",
                "--schedule",
                "1f1b",
                "--stages",
                "4",
                "--chunks",
                "8",
                "--forward",
                "-2",
            ]
        )
        == 2
    )
    assert "--forward -2.0: expected a finite time >= 0" in capsys.readouterr().err


def test_times_must_be_finite_and_not_all_zero():
    from scratchlm.train.pipeline_schedule import simulate

    with pytest.raises(ValueError, match="finite time"):
        simulate("1f1b", 2, 2, forward=float("inf"))
    with pytest.raises(ValueError, match="all 0"):
        simulate("1f1b", 2, 2, forward=0, backward_input=0, backward_weight=0)


@pytest.mark.parametrize("P", [4, 8])
def test_dualpipe_holds_p_plus_one_activations_on_every_rank_and_says_when_table2_does_not_apply(P):
    from scratchlm.train.pipeline_schedule import simulate

    timeline = simulate("dualpipe", P, 2 * P + 4)
    assert timeline.activation_memory == [P + 1] * P
    assert timeline.to_dict(events=False)["table2_conditions_hold"]
    off = simulate("dualpipe", P, 2 * P + 4, forward=1, backward_input=1, backward_weight=1.5).to_dict(
        events=False
    )
    assert not off["table2_conditions_hold"] and off["max_bubble"] > off["table2_bubble"]
