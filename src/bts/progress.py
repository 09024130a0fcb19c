"""Progress that reads well on a terminal and in a log file.

`progress(...)` is a tqdm bar when stderr is a terminal. Otherwise (stderr redirected to a file,
a CI job, a batch scheduler) it is a `LogProgress`: the same small API (`update`, `set_postfix`,
`set_postfix_str`, `set_description`, iteration, `close`, `with`), writing one plain line to
stderr at most every `BTS_PROGRESS_SECONDS` seconds (default 30) and a final line when it
finishes, never a carriage return:

    [bts] seed: step 120/600 (20%), loss=4.1230, tok_s=9100, 1m12s, eta 4m48s
    [bts] seed: step 600/600 (100%), loss=3.2010, tok_s=9150, done in 6m01s

`leave=False` (as in tqdm) drops the final line of a loop that finished before its first
progress line: short inner loops (one evaluation batch loop per system and task) stay silent
in a log unless they are slow.

`quiet_libraries()` turns off the progress bars of transformers (weight loading, "Writing model
shards"), huggingface_hub and datasets, and mergekit's info logging, when stderr is not a
terminal; the CLI calls it once at start.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

ENV_SECONDS = "BTS_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0
PREFIX = "[bts]"
# Environment variables that switch the Hugging Face libraries' bars off before they are imported.
_HF_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")

_clock = time.monotonic  # a module attribute so that tests can drive the time


def stderr_is_terminal() -> bool:
    """Whether stderr (as it is now: pytest and CliRunner replace it) is an interactive terminal."""
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def interval_seconds() -> float:
    """Seconds between two progress lines in a log: BTS_PROGRESS_SECONDS, or 30."""
    raw = os.environ.get(ENV_SECONDS, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        logging.getLogger(__name__).warning(
            "%s=%r is not a number of seconds >= 0: using %g", ENV_SECONDS, raw, DEFAULT_SECONDS
        )
        return DEFAULT_SECONDS
    return value


def progress(
    iterable: Iterable | None = None,
    total: int | float | None = None,
    desc: str = "",
    initial: int | float = 0,
    unit: str = "it",
    disable: bool | None = False,
    leave: bool = True,
    **kw: Any,
) -> tqdm | LogProgress:
    """A tqdm bar on a terminal, a `LogProgress` otherwise; `disable=True` shows nothing.

    `disable=None` means the same as False here (tqdm would switch a bar off when stderr is not
    a terminal; a log gets plain lines instead). Other keyword arguments go to tqdm only.
    """
    common = dict(total=total, desc=desc, initial=initial, unit=unit, disable=bool(disable))
    if stderr_is_terminal():
        return tqdm(iterable, leave=leave, **common, **kw)
    return LogProgress(iterable, leave=leave, **common)


class LogProgress:
    """A progress bar for logs: a plain line at most every `interval` seconds, and a final one."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | float | None = None,
        desc: str = "",
        initial: int | float = 0,
        unit: str = "it",
        disable: bool = False,
        leave: bool = True,
        interval: float | None = None,
    ) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc or ""
        self.n = initial
        self.initial = initial
        self.unit = unit
        self.disable = disable
        self.leave = leave
        self.interval = interval_seconds() if interval is None else interval
        self.postfix = ""
        self.lines = 0  # lines written so far
        self.start = _clock()
        self._last = self.start
        self._closed = False

    # ------------------------------------------------------------------ the tqdm API

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress has no iterable: use update(n)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total) if self.total is not None else len(self.iterable)  # type: ignore[arg-type]

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int | float = 1) -> None:
        """Advance by `n`; write a line if `interval` seconds passed since the last one."""
        self.n += n
        if self.disable or self._closed:
            return
        now = _clock()
        if now - self._last >= self.interval and not self._finished():
            self._write(self._line(now, final=False))
            self._last = now

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        """`key=value` pairs shown after the count (numbers get 4 significant digits)."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={_format_value(v)}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """Nothing to redraw in a log (tqdm API)."""

    def close(self) -> None:
        """Write the final line (once): always with `leave`, else only after a progress line."""
        if self._closed:
            return
        self._closed = True
        if not self.disable and (self.leave or self.lines):
            self._write(self._line(_clock(), final=True))

    # ------------------------------------------------------------------ formatting

    def _finished(self) -> bool:
        return self.total is not None and self.n >= self.total

    def _line(self, now: float, final: bool) -> str:
        elapsed = now - self.start
        count = f"{self.unit} {_format_count(self.n)}"
        if self.total is not None:
            pct = 100.0 if not self.total else 100.0 * self.n / self.total
            count += f"/{_format_count(self.total)} ({pct:.0f}%)"
        parts = [count]
        if self.postfix:
            parts.append(self.postfix)
        if final:
            word = "done in" if self.total is None or self._finished() else "stopped after"
            parts.append(f"{word} {duration(elapsed)}")
        else:
            parts.append(duration(elapsed))
            done = self.n - self.initial
            if self.total is not None and done > 0:
                parts.append(f"eta {duration(elapsed * (self.total - self.n) / done)}")
        head = f"{PREFIX} {self.desc}: " if self.desc else f"{PREFIX} "
        return head + ", ".join(parts)

    def _write(self, line: str) -> None:
        stream = sys.stderr  # looked up now: pytest and CliRunner swap it
        if stream is None:
            return
        stream.write(line.replace("\r", " ") + "\n")
        stream.flush()
        self.lines += 1


def _format_count(n: int | float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{n:.4g}"


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def duration(seconds: float) -> str:
    """4.2 s, 3m07s, 2h05m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# ---------------------------------------------------------------------- other libraries' bars


def quiet_libraries() -> bool:
    """Switch off third-party progress bars when stderr is not a terminal; True if it did.

    transformers ("Loading weights", "Writing model shards"), huggingface_hub (downloads) and
    datasets: through their environment variables for a library not imported yet, and their
    own switch for one already imported. A variable the user set is left as it is. mergekit's
    info logging is turned down to warnings (its bars are off through `MergeOptions.quiet`).
    """
    logging.getLogger("mergekit").setLevel(logging.WARNING)
    if stderr_is_terminal():
        return False
    user_set = {name for name in _HF_ENV if name in os.environ}
    for name in _HF_ENV:
        os.environ.setdefault(name, "1")
    hub_env = "HF_HUB_DISABLE_PROGRESS_BARS" not in user_set
    if hub_env and "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if hub_env and "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "HF_DATASETS_DISABLE_PROGRESS_BARS" not in user_set and "datasets" in sys.modules:
        from datasets.utils import disable_progress_bars as disable_datasets_bars

        disable_datasets_bars()
    return True
