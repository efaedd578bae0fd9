"""The JSONL metrics log (format, resume, torn lines) and the console progress line."""

import json
import math
import re
from datetime import datetime, timezone

import numpy as np
import pytest

from fluxflow_jax.pipeline.console import (RunningAverage, averaging_window, format_duration,
                                           progress_line)
from fluxflow_jax.pipeline.metrics_log import MetricsFileError, MetricsLog, read_metrics

METRICS = "graph/training_metrics_vae.jsonl"


def _log_steps(output, steps, resume_from_step=None, name="vae"):
    with MetricsLog(output, name, resume_from_step=resume_from_step) as log:
        for step in steps:
            log.log(epoch=step // 4, batch=step % 4, global_step=step,
                    metrics={"loss_recon": 0.1 * step, "lr_vae": 1e-4})
    return log


def _session(output, name="vae"):
    return json.loads((output / f"graph/session_{name}.json").read_text())


def test_record_fields_and_types(tmp_path):
    with MetricsLog(tmp_path, "vae_gan") as log:
        log.log(epoch=2, batch=7, global_step=31,
                metrics={"loss_recon": np.float32(0.25), "loss_kl": 12.5, "skipped": 0.0,
                         "lr_vae": np.float32(1e-4), "lr_disc": 2e-4},
                extras={"batch_time": 0.5, "images_per_second": 16.0, "skipped_total": 3})
    [record] = read_metrics(tmp_path / "graph/training_metrics_vae_gan.jsonl")
    assert list(record) == ["timestamp", "session_id", "epoch", "batch", "global_step",
                            "metrics", "learning_rates", "extras"]
    stamp = datetime.fromisoformat(record["timestamp"])
    assert stamp.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 60
    assert re.fullmatch(r"\d{8}_\d{6}", record["session_id"])
    assert record["session_id"] == log.session_id
    assert (record["epoch"], record["batch"], record["global_step"]) == (2, 7, 31)
    assert record["metrics"] == {"loss_recon": 0.25, "loss_kl": 12.5, "skipped": 0.0}
    assert all(type(value) is float for value in record["metrics"].values())
    assert record["learning_rates"] == {"lr_vae": pytest.approx(1e-4), "lr_disc": 2e-4}
    assert record["extras"] == {"batch_time": 0.5, "images_per_second": 16.0,
                                "skipped_total": 3}
    assert type(record["extras"]["skipped_total"]) is int
    session = _session(tmp_path, "vae_gan")
    assert session["session_id"] == log.session_id and session["resumed_count"] == 0
    assert {"created_at", "last_update"} <= set(session) and "last_resume_at" not in session


def test_each_record_is_flushed_before_close(tmp_path):
    log = MetricsLog(tmp_path, "vae")
    log.log(0, 0, 0, {"loss_recon": 1.0})
    assert len(read_metrics(tmp_path / METRICS)) == 1
    log.close()


def test_non_finite_values_are_written_as_null(tmp_path):
    with MetricsLog(tmp_path, "vae") as log:
        log.log(0, 0, 0, {"loss_recon": float("nan"), "loss_kl": np.float32("inf"),
                          "lr_vae": float("-inf")}, extras={"batch_time": float("nan")})
    text = (tmp_path / METRICS).read_text()
    assert "NaN" not in text and "Infinity" not in text
    [record] = read_metrics(tmp_path / METRICS)
    assert record["metrics"] == {"loss_recon": None, "loss_kl": None}
    assert record["learning_rates"] == {"lr_vae": None}
    assert record["extras"] == {"batch_time": None}


def test_empty_step_name_uses_the_plain_names(tmp_path):
    _log_steps(tmp_path, [0], name="")
    assert sorted(p.name for p in (tmp_path / "graph").iterdir()) == [
        "session.json", "training_metrics.jsonl"]


def test_step_name_must_not_be_a_path(tmp_path):
    with pytest.raises(ValueError, match="path separator"):
        MetricsLog(tmp_path, "../vae")


def test_resume_keeps_the_session_and_counts_resumes(tmp_path):
    first = _log_steps(tmp_path, range(4))
    created = _session(tmp_path)["created_at"]
    second = _log_steps(tmp_path, range(4, 6), resume_from_step=3)
    session = _session(tmp_path)
    assert second.session_id == first.session_id == session["session_id"]
    assert session["resumed_count"] == 1 and session["created_at"] == created
    assert "last_resume_at" in session
    _log_steps(tmp_path, [], resume_from_step=5)
    assert _session(tmp_path)["resumed_count"] == 2
    records = read_metrics(tmp_path / METRICS)
    assert [r["global_step"] for r in records] == list(range(6))
    assert {r["session_id"] for r in records} == {first.session_id}


def test_resume_drops_records_past_the_resumed_step(tmp_path):
    _log_steps(tmp_path, range(10))  # killed after logging step 9, checkpoint at step 5
    _log_steps(tmp_path, range(6, 8), resume_from_step=5)
    assert [r["global_step"] for r in read_metrics(tmp_path / METRICS)] == list(range(8))


def test_resume_without_a_session_file_takes_the_records_session(tmp_path):
    first = _log_steps(tmp_path, range(3))
    (tmp_path / "graph/session_vae.json").unlink()
    assert _log_steps(tmp_path, [], resume_from_step=2).session_id == first.session_id
    assert _session(tmp_path)["resumed_count"] == 1


def test_a_fresh_start_replaces_the_old_run(tmp_path):
    _log_steps(tmp_path, range(5))
    _log_steps(tmp_path, range(2))
    assert [r["global_step"] for r in read_metrics(tmp_path / METRICS)] == [0, 1]
    assert _session(tmp_path)["resumed_count"] == 0


def test_a_torn_last_line_is_ignored_by_readers_and_dropped_on_resume(tmp_path):
    _log_steps(tmp_path, range(3))
    path = tmp_path / METRICS
    whole = path.read_bytes()
    with open(path, "ab") as handle:
        handle.write(whole.splitlines(keepends=True)[-1][:40])  # killed mid-write
    assert [r["global_step"] for r in read_metrics(path)] == [0, 1, 2]
    _log_steps(tmp_path, [3], resume_from_step=2)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["global_step"] for line in lines] == [0, 1, 2, 3]


def test_a_damaged_line_before_the_last_is_an_error(tmp_path):
    _log_steps(tmp_path, range(3))
    path = tmp_path / METRICS
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"{not json\n" + b"".join(lines[1:]))
    with pytest.raises(MetricsFileError, match="line 2"):
        read_metrics(path)


@pytest.mark.parametrize("seconds, text", [
    (0, "0000:00:00.000"),
    (923.123, "0000:15:23.123"),
    (59.9994, "0000:00:59.999"),
    (59.9999, "0000:01:00.000"),  # rounded to the millisecond first, then carried
    (3599.9996, "0001:00:00.000"),
    (3600 * 10000 - 0.001, "9999:59:59.999"),
    (3600 * 10000, "10000:00:00.000"),  # hours widen, never wrap
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [-0.5, math.nan, math.inf])
def test_format_duration_rejects_impossible_durations(seconds):
    with pytest.raises(ValueError):
        format_duration(seconds)


def test_progress_line_for_a_vae_gan_step():
    losses = {"VAE": 0.0234, "KL": 12.45, "G": 0.156, "D": 0.089, "LPIPS": 0.0812}
    line = progress_line(923.123, "vae_gan", 2, 3, 5, 20, 127, 500, losses, 3.2)
    assert line == ("[0000:15:23.123] Step vae_gan (2/3) | Epoch 5/20 | Batch 127/500 | "
                    "VAE: 0.0234 | KL: 12.4500 | G: 0.1560 | D: 0.0890 | LPIPS: 0.0812 | "
                    "3.20s/batch")


def test_progress_line_for_a_flow_step_with_skipped_batches():
    line = progress_line(5, "flow", 3, 3, 1, 10, 0, 250, {"Flow": 0.12344}, 0.854,
                         skipped=2)
    assert line == ("[0000:00:05.000] Step flow (3/3) | Epoch 1/10 | Batch 0/250 | "
                    "Flow: 0.1234 | skipped 2 | 0.85s/batch")


def test_running_average_keeps_the_window_and_skips_non_finite_values():
    average = RunningAverage(3)
    for value in [1.0, 2.0, 3.0, float("nan"), 4.0, 5.0]:
        average.update({"loss_recon": value, "loss_kl": np.float32(value * 2)})
    average.update({"flow_loss": float("inf")})
    assert average.averages() == {"loss_recon": 4.0, "loss_kl": 8.0}
    assert averaging_window(1) == 10 and averaging_window(20) == 40
    with pytest.raises(ValueError):
        RunningAverage(0)
