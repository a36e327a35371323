"""One rich progress bar style for all long work: count, rate, elapsed, ETA, and any figures the work reports.

A task's own figures are its rich fields: `bar.update(task, advance=1, loss=0.42)` shows `loss 0.42` after the
ETA, on the bar and on the plain lines printed off a terminal; a `unit=` field gives a task its own unit (the
steps within an episode on a bar of episodes). Off a terminal, a task with figures or already reported ends with
its last line.
"""

from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

LOG_EVERY_S = 30.0  # off a terminal, one plain progress line per task this often
UNIT = "unit"  # a task field naming that task's own unit, where it counts other things than the bar's others


class RateColumn(ProgressColumn):
    """Items per second, e.g. '12.3 steps/s'."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:.1f} {task.fields.get(UNIT, self.unit)}/s", style="cyan")


class FieldsColumn(ProgressColumn):
    """The task's own figures (rich task fields), e.g. 'loss 0.4213'."""

    def render(self, task: Task) -> Text:
        return Text(_figures(task.fields), style="magenta")


def _figures(fields: dict) -> str:
    return ", ".join(
        f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
        for name, value in fields.items()
        if name != UNIT
    )


def _clock(seconds: float | None) -> str:
    """Seconds as m:ss or h:mm:ss (what the bar's columns show); '?' when unknown."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_bar(unit: str = "steps", transient: bool = False, console: Console | None = None) -> Progress:
    """A Progress showing done/total, `unit`/s, elapsed and ETA; off a terminal (logs, CI, nohup) a plain
    line per task every LOG_EVERY_S seconds instead, so long work is never silent for minutes."""
    console = console or Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        FieldsColumn(),
    )
    if not console.is_terminal:
        return _LineProgress(*columns, unit=unit, console=console)
    return Progress(*columns, transient=transient, console=console)


class _LineProgress(Progress):
    """A disabled Progress that prints "description: done/total unit, rate, elapsed, ETA, figures" lines from a
    thread. The rate is rich's recent one, else the mean since the task began (a step slower than rich's 30 s
    window still gets an ETA); a task resumed part way (`completed=` at `add_task`) counts only the work since."""

    def __init__(self, *columns, unit: str, console: Console):
        super().__init__(*columns, console=console, disable=True)
        self.unit = unit
        self._stopping = threading.Event()
        self._reporter: threading.Thread | None = None
        self._began: dict[int, float] = {}  # completed at add_task
        self._reported: set[int] = set()  # tasks a line was printed for

    def add_task(self, description: str, *args, completed: float = 0, **kwargs) -> int:
        task = super().add_task(description, *args, completed=completed, **kwargs)
        self._began[task] = completed
        return task

    def start(self) -> None:
        super().start()
        self._stopping.clear()
        self._reporter = threading.Thread(target=self._report, name="sfcache-progress-log", daemon=True)
        self._reporter.start()

    def stop(self) -> None:
        """Stop reporting; a task already reported, or one with figures (the loss), that moved ends with its last
        line (a short task without figures, such as indexing, prints nothing)."""
        self._stopping.set()
        if self._reporter is not None:
            self._reporter.join()
            for task in self.tasks:
                moved = task.completed > self._began.get(task.id, 0)
                if task.visible and moved and (task.id in self._reported or _figures(task.fields)):
                    self.console.print(self.line(task), markup=False, highlight=False)
            self._reporter = None
        super().stop()

    def line(self, task: Task) -> str:
        """One plain progress line of `task`."""
        elapsed = task.elapsed or 0.0
        done_here = task.completed - self._began.get(task.id, 0)
        speed = task.finished_speed or task.speed or (done_here / elapsed if elapsed > 0 and done_here > 0 else None)
        total = "?" if task.total is None else f"{task.total:.0f}"
        rate = "-" if speed is None else f"{speed:.1f}"
        eta = None if task.total is None or not speed else max(task.total - task.completed, 0) / speed
        figures, unit = _figures(task.fields), task.fields.get(UNIT, self.unit)
        return (
            f"{task.description}: {task.completed:.0f}/{total} {unit}, {rate} {unit}/s, "
            f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}" + (f", {figures}" if figures else "")
        )

    def _report(self) -> None:
        while not self._stopping.wait(LOG_EVERY_S):
            for task in self.tasks:
                if task.visible:
                    self.console.print(self.line(task), markup=False, highlight=False)
                    self._reported.add(task.id)
