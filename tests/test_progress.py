"""Progress off a terminal (logs, nohup): every plain line carries the ETA and the task's own figures."""

from __future__ import annotations

import io
import time

from rich.console import Console

import sfcache.progress as progress


def test_plain_lines_carry_rate_eta_and_the_tasks_figures():
    clock = [100.0]
    bar = progress.progress_bar("steps", console=Console(file=io.StringIO()))
    bar.get_time = lambda: clock[0]
    task = bar.add_task("train", total=150, completed=50)  # resumed at step 50: only the steps since count
    clock[0] = 110.0
    bar.update(task, advance=5, loss=0.5)
    assert bar.line(bar.tasks[0]) == "train: 55/150 steps, 0.5 steps/s, 0:10 elapsed, ETA 3:10, loss 0.5"
    clock[0] = 120.0
    bar.update(task, advance=10, loss=0.123456)  # rich's recent rate once it has two samples: 10 steps in 10 s
    assert bar.line(bar.tasks[0]) == "train: 65/150 steps, 1.0 steps/s, 0:20 elapsed, ETA 1:25, loss 0.1235"
    unknown = bar.add_task("indexing", total=None)
    assert bar.line(bar.tasks[1]) == "indexing: 0/? steps, - steps/s, 0:00 elapsed, ETA ?"
    assert unknown == 1 and progress._clock(3725) == "1:02:05"


def test_the_reporter_thread_prints_lines_with_eta(monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.05)
    log = io.StringIO()
    with progress.progress_bar("episodes", console=Console(file=log)) as bar:
        task = bar.add_task("eval", total=4)
        time.sleep(0.1)
        bar.update(task, advance=1, success=1)
        time.sleep(0.3)
    lines = log.getvalue().splitlines()
    assert lines[-1].startswith("eval: 1/4 episodes, ") and ", ETA " in lines[-1] and lines[-1].endswith("success 1")


def test_the_terminal_bar_shows_the_figures_too():
    bar = progress.progress_bar("steps", console=Console(file=io.StringIO(), force_terminal=True))
    task = bar.add_task("train", total=3, loss=0.42137)
    assert progress.FieldsColumn().render(bar.tasks[task]).plain == "loss 0.4214"


def test_a_task_of_its_own_unit_hidden_tasks_and_the_closing_line(monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 60)  # no periodic line: what is printed is the closing one
    log = io.StringIO()
    with progress.progress_bar("episodes", console=Console(file=log)) as bar:
        bar.add_task("suite", total=4)  # no progress: no closing line
        quick = bar.add_task("indexing", total=None)  # short, no figures, never reported: no closing line
        bar.update(quick, advance=3)
        within = bar.add_task("episode", total=220, visible=False, unit="steps")
        hidden = bar.add_task("hidden", total=3, visible=False)
        bar.update(hidden, advance=1)
        bar.reset(within, description="task 0 trial 0", visible=True)
        bar.update(within, completed=8, loss=0.5)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("task 0 trial 0: 8/220 steps, ") and lines[0].endswith("loss 0.5")
