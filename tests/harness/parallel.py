"""Jobs side by side, in threads: starting Synapse processes takes seconds each, mostly spent
importing Synapse."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence


def run_parallel(jobs: Sequence[Callable[[], object]]) -> None:
    """Each job in a thread of its own; the first exception, if any, once all have ended."""
    errors: list[BaseException] = []

    def wrap(job: Callable[[], object]) -> None:
        try:
            job()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
