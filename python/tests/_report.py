"""The largest engine-vs-reference difference seen per quantity in a run (output, l_aux,
dx, gradients, parameters after optimizer steps, logits); conftest prints them at the end,
so a passing run still shows how close the engine came."""

import os

_DIFFS: dict = {}


def record_diff(name: str, value: float) -> None:
    value = float(value)
    if value > _DIFFS.get(name, (-1.0, ""))[0]:
        where = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
        _DIFFS[name] = (value, where)
