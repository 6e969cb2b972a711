"""Shared setup of the torch-side tests.

* DeepSpeed runs on its CPU accelerator (``DS_ACCELERATOR=cpu``) whatever the machine has.
* torch runs on one thread: the tensors here are tiny, and torch's OpenMP pool on a
  busy machine costs more than it gives (a DeepSpeed forward took 37 ms on two threads
  of a loaded two-core machine, 1 ms on one).
* ``record_diff(name, value)`` keeps the largest difference seen per quantity (output,
  l_aux, dx, gradients, parameters after optimizer steps); the maxima are printed at
  the end of the run, so a passing run still shows how close the engine came.
"""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest

try:
    import torch
except ImportError:  # the tests that need torch skip themselves
    torch = None
else:
    torch.set_num_threads(1)

from _report import _DIFFS, record_diff  # noqa: E402


@pytest.fixture
def diffs():
    return record_diff


def pytest_terminal_summary(terminalreporter):
    if _DIFFS:
        terminalreporter.section("max |engine - reference| (DeepSpeed, transformers)")
        for name in sorted(_DIFFS):
            value, where = _DIFFS[name]
            terminalreporter.write_line(f"{name:<28} {value:.3e}  {where}")
