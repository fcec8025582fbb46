"""TensorFlow's start-up lines, filtered out of stderr while it loads.

TensorFlow's C++ code prints a handful of lines while it loads (oneDNN, the CUDA stub,
cuInit, CPU features), before its own logging is configured, so
``TF_CPP_MIN_LOG_LEVEL`` does not hide them. :func:`filtered_stderr` drops exactly
those lines from file descriptor 2 for the duration of a block; every other line
passes, in order. ``DLPIPE_DEBUG=1`` (``dlpipe --debug``) shows everything.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

#: ``1`` shows everything TensorFlow prints while it starts (``dlpipe --debug`` sets it).
DEBUG_ENV = "DLPIPE_DEBUG"

# The oneDNN and CUDA-stub lines come twice: two of TensorFlow's libraries print them.
_GLOG_PREFIX = r"\d{4} \d\d:\d\d:[\d.]+ +\d+ [^ \]]+:\d+\] "
_INFO_NOISE = (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    # the second line of cpu_feature_guard's message
    r"^To enable the following instructions: .*, in other operations, rebuild TensorFlow "
    r"with the appropriate compiler flags\.$",
)
_HARMLESS_ERRORS = (  # the CUDA build registers its plugins twice
    r"\] Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory for "
    r"plugin \w+ when one has already been registered$",
    r"\] computation placer already registered\. ",
)
# cuInit fails on every machine without an NVIDIA driver; with one, it is a real error.
_NO_GPU_ERROR = r"\] failed call to cuInit: "

# The filter process: copies its stdin to its stderr, less the lines that match argv[1].
_FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # it ends when the pipe closes
noise = re.compile(sys.argv[1])
for line in sys.stdin.buffer:
    if not noise.search(line.decode("utf-8", "replace").rstrip("\\r\\n")):
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()
"""


def startup_noise() -> str:
    """One regular expression for the start-up lines not to show: below
    ``TF_CPP_MIN_LOG_LEVEL`` (1: INFO, 2: and WARNING, 3: and ERROR), and the known
    harmless errors."""
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    patterns = list(_HARMLESS_ERRORS)
    if level >= 1:
        patterns += [*_INFO_NOISE, f"^[{'IWE'[:min(level, 3)]}]{_GLOG_PREFIX}"]
    if not Path("/proc/driver/nvidia").exists():
        patterns.append(_NO_GPU_ERROR)
    return "|".join(f"(?:{p})" for p in patterns)


@contextlib.contextmanager
def filtered_stderr(noise: str) -> Iterator[None]:
    """Drop the lines matching ``noise`` from what is written to stderr (file
    descriptor 2, C++ code included) in the block; every other line passes, in order.

    A separate process filters, not a thread or a file: when the block takes the
    interpreter down (TensorFlow aborts on a CPU it was not built for), the filter still
    prints why. Where no filter can start, nothing is filtered.
    """
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield
        return
    read, write = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER, noise],
            stdin=read, stdout=subprocess.DEVNULL, stderr=saved,
        )
    except OSError:
        proc = None
    os.close(read)
    if proc is not None:
        os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()  # Python's own buffered writes in the block go through it too
        os.dup2(saved, 2)
        os.close(saved)
        if proc is not None:
            # The pipe is closed now: the filter passes on what is left and ends.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
