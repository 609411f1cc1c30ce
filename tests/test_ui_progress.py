"""Progress with an ETA (issue 28 item 4): the text says the speed so far and the time left, measured from the
first report, in Generate, the explorer and storyboards (one StepProgress each)."""

from __future__ import annotations

from studio.ui.progress import StepProgress, clock, eta_text


def test_eta_text_says_speed_and_time_left():
    assert eta_text("step 0/20", 0, 20, 0.0) == "step 0/20"  # nothing measured yet
    assert eta_text("batch 1/1, step 5/20", 5, 15, 10.0) == "batch 1/1, step 5/20 · 2.00 s/step · ETA 0:30"
    assert eta_text("step 10/25", 10, 15, 0.5) == "step 10/25 · 20.0 steps/s · ETA 0:01"
    assert clock(3725) == "1:02:05" and clock(59.6) == "1:00" and clock(-3) == "0:00"


def test_step_progress_measures_from_the_first_report():
    calls, times = [], iter([100.0, 160.0, 161.0, 162.0])

    def progress(value, desc, unit):
        calls.append((value, desc, unit))

    report = StepProgress(progress, now=lambda: next(times))
    report(0, 20, "step 0/20")  # the first report: what came before (loading, maps) is not counted
    report(1, 20, "step 1/20")  # 60 s for the first step (a compile, say)
    report(2, 20, "step 2/20")
    report(3, 20, "step 3/20")
    assert calls[0] == ((0, 20), "step 0/20", "steps")
    assert calls[1][1] == "step 1/20 · 60.00 s/step · ETA 19:00"
    assert calls[3][1] == "step 3/20 · 20.67 s/step · ETA 5:51"
    assert [c[0] for c in calls] == [(0, 20), (1, 20), (2, 20), (3, 20)]
