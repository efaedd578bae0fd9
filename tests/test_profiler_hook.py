"""The profiler hook switches tracing on and off only once the run's checkpoint writes are
done: CPython can crash when a thread starts or ends while profiling is switched in every
thread, and an asynchronous checkpoint write runs in a thread of its own."""

from __future__ import annotations

from types import SimpleNamespace

import jax

from fluxflow_jax.pipeline.hooks.profiler import Profiler
from fluxflow_jax.pipeline.position import Position


def test_the_trace_starts_and_stops_after_the_pending_writes(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda *_, **__: calls.append("start"))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append("stop"))
    hook = Profiler(tmp_path, "3:5", echo=calls.append, settle=lambda: calls.append("settle"))
    state = SimpleNamespace(leaves=[])

    hook.start_stage(None, Position(global_step=2), resuming=False)
    hook(state, SimpleNamespace(global_step=3))  # global step 3 done: the trace starts
    assert calls == ["settle", "start"]
    hook(state, SimpleNamespace(global_step=4))
    assert calls == ["settle", "start"]
    hook(state, SimpleNamespace(global_step=5))  # ... and stops once step 5 is done
    assert calls[2:4] == ["settle", "stop"]
    assert calls[4] == (f"Profile of global steps 4-5 written to {tmp_path / 'profile'} "
                        "(tensorboard --logdir, or perfetto_trace.json.gz in Perfetto)")
    hook.close()
    assert len(calls) == 5  # stopped once
