"""bench/decode_profile.py's trace reading: per-step op totals from synthetic Chrome trace events
(the profiler run itself is the bench's, not a test's)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "bench"))

import decode_profile


def x(name, ts, dur, tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid}


def test_ops_inside_steps_summed_per_step():
    events = [
        x("$engine.py:329 step", 1000, 500, tid=0), x("$engine.py:329 step", 3000, 700, tid=0),
        x("ffi_call.35", 1100, 300), x("ffi_call.35", 3100, 500),   # one a step
        x("ynn_fusion.4", 1450, 20), x("ynn_fusion.4", 1460, 40),    # two in the first step
        x("ffi_call.20", 200, 900),                                  # before any step: prefill
        x("ThunkExecutor::Execute", 1010, 480),                      # a wrapper, not an op
        x("np.asarray(jax.Array)", 1005, 490, tid=0),                # the host waiting
        x("$generate.py:75 run", 0, 5000, tid=0),                    # a Python frame
        {"ph": "i", "name": "ffi_call.35", "ts": 1200},              # not a complete event
    ]
    got = decode_profile.per_step(events)
    assert got["steps"] == 2 and got["step_ms"] == pytest.approx(0.7)
    assert list(got["ops"]) == ["ffi_call.35", "ynn_fusion.4"]  # largest first, nothing else
    assert got["ops"]["ffi_call.35"] == {"ms": pytest.approx(0.4), "calls": 1.0}
    assert got["ops"]["ynn_fusion.4"] == {"ms": pytest.approx(0.03), "calls": 1.0}


def test_a_trace_without_decode_steps_is_an_error():
    with pytest.raises(ValueError, match="no decode step"):
        decode_profile.per_step([x("ffi_call.1", 0, 10)])
