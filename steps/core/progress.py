"""Progress bars for long loops (blocks pruned, windows evaluated): on stderr, with the time
left, and only when asked (the CLI asks unless --quiet; flows do not, their logs stay clean).

    with progress_bar(len(blocks), "wanda: blocks", enabled=ctx.progress) as advance:
        for block in blocks:
            ...
            advance()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(total: int, description: str, enabled: bool) -> Iterator[Callable[[], None]]:
    """Yields `advance()`, which moves the bar one item; a no-op when not enabled."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
