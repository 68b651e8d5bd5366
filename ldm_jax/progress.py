"""Progress bars for the long commands (`sample`, `encode`, `evaluate`, `convert`).

One tqdm bar on process 0, shown when a person watches (stderr is a terminal) or when
`LDM_JAX_PROGRESS=1`; `LDM_JAX_PROGRESS=0` hides it. The commands' periodic log lines (rate, ETA)
stay either way: they are the progress of a job whose output goes to a file. Training keeps its
log lines and ETA (clu's ReportProgress) and has no bar.
"""
from __future__ import annotations

import os
import sys

import jax
from tqdm import tqdm

ENV = "LDM_JAX_PROGRESS"


def shown() -> bool:
    """Whether this process draws progress bars."""
    if jax.process_index() != 0:
        return False
    setting = os.environ.get(ENV, "")
    return setting == "1" or (setting != "0" and sys.stderr.isatty())


def bar(total: int | None, description: str, unit: str = "images") -> tqdm:
    """A bar of `total` `unit`s (a context manager; `.update(n)` as work is done), drawn if `shown()`."""
    return tqdm(total=total, desc=description, unit=unit, disable=not shown(), dynamic_ncols=True,
                file=sys.stderr)
