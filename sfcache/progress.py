"""One rich progress bar style for all long work: count, rate, elapsed, ETA."""

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


class RateColumn(ProgressColumn):
    """Items per second, e.g. '12.3 steps/s'."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:.1f} {self.unit}/s", style="cyan")


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
    )
    if not console.is_terminal:
        return _LineProgress(*columns, unit=unit, console=console)
    return Progress(*columns, transient=transient, console=console)


class _LineProgress(Progress):
    """A disabled Progress that prints "description: done/total unit, rate, elapsed" lines from a thread."""

    def __init__(self, *columns, unit: str, console: Console):
        super().__init__(*columns, console=console, disable=True)
        self.unit = unit
        self._stopping = threading.Event()
        self._reporter: threading.Thread | None = None

    def start(self) -> None:
        super().start()
        self._stopping.clear()
        self._reporter = threading.Thread(target=self._report, name="sfcache-progress-log", daemon=True)
        self._reporter.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._reporter is not None:
            self._reporter.join()
        super().stop()

    def _report(self) -> None:
        while not self._stopping.wait(LOG_EVERY_S):
            for task in self.tasks:
                speed = task.finished_speed or task.speed
                total = "?" if task.total is None else f"{task.total:.0f}"
                rate = "-" if speed is None else f"{speed:.1f}"
                self.console.print(
                    f"{task.description}: {task.completed:.0f}/{total} {self.unit}, {rate} "
                    f"{self.unit}/s, {task.elapsed or 0:.0f} s elapsed",
                    markup=False,
                    highlight=False,
                )
