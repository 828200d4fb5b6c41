"""A pytest plugin that appends one JSON line per test to a file as each test ends, so
that a run killed at its time limit still leaves what it finished (device_run.sh).

    FASTATTN_PYTEST_JSONL=out.jsonl python -m pytest -p fastattn.bench.pytest_jsonl ...

Rows: {"kind": "test", "nodeid", "outcome" (passed | failed | skipped | error),
"duration_s", "message" (failure text, cut, or the skip reason), "properties" (what
the test gave `record_property`)}; at the end one {"kind": "summary", "counts",
"exitstatus", "duration_s"}. Under pytest-xdist only the controller writes (the
workers' reports reach it with their properties).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

ENV = "FASTATTN_PYTEST_JSONL"
MESSAGE_CHARS = 2000

_state = {"path": None, "started": None, "counts": {}}


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _append(row: dict) -> None:
    path = _state["path"]
    if path is None:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=_jsonable) + "\n")


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: the controller writes
        return
    path = os.environ.get(ENV, "").strip()
    if path:
        _state.update(path=path, started=time.monotonic(), counts={})


def _message(report) -> Optional[str]:
    if report.skipped:
        longrepr = report.longrepr
        if isinstance(longrepr, tuple) and len(longrepr) == 3:
            return str(longrepr[2]).removeprefix("Skipped: ")
        return str(longrepr)
    if report.failed:
        text = report.longreprtext or ""
        return text[-MESSAGE_CHARS:]
    return None


def pytest_runtest_logreport(report):
    if _state["path"] is None:
        return
    if report.when == "call":
        outcome = report.outcome
    elif report.when in ("setup", "teardown") and not report.passed:
        outcome = "skipped" if report.skipped else "error"
    else:
        return
    _state["counts"][outcome] = _state["counts"].get(outcome, 0) + 1
    _append({"kind": "test", "nodeid": report.nodeid, "outcome": outcome, "when": report.when,
             "duration_s": round(report.duration, 3), "message": _message(report),
             "properties": {k: v for k, v in report.user_properties}})


def pytest_sessionfinish(session, exitstatus):
    if _state["path"] is None:
        return
    _append({"kind": "summary", "counts": dict(_state["counts"]), "exitstatus": int(exitstatus),
             "duration_s": round(time.monotonic() - _state["started"], 1)})
