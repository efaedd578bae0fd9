"""Training graphs and summaries from metrics files, and the ``graphs`` command."""

import numpy as np
import pytest
from PIL import Image

from fluxflow_jax.cli import main
from fluxflow_jax.pipeline.graphs import write_graphs
from fluxflow_jax.pipeline.metrics_log import MetricsLog

VAE_STEPS, FLOW_STEPS = 40, 30


def _series(rng, n, start):
    return start * np.exp(-np.linspace(0, 2, n)) * rng.uniform(0.9, 1.1, n)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps of a run (the flow step's global steps continue the VAE step's), with a null
    and a resume, and the values written, for an independent check."""
    output = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    vae = {"loss_recon": _series(rng, VAE_STEPS, 0.5), "loss_kl": _series(rng, VAE_STEPS, 20),
           "kl_beta": np.linspace(0, 1e-3, VAE_STEPS), "loss_gen": _series(rng, VAE_STEPS, 1),
           "loss_disc": _series(rng, VAE_STEPS, 0.7), "r1_penalty": np.zeros(VAE_STEPS),
           "lr_vae": np.linspace(1e-4, 1e-5, VAE_STEPS), "lr_disc": np.full(VAE_STEPS, 2e-4)}
    vae["loss_gen"][7] = np.nan
    flow = {"flow_loss": _series(rng, FLOW_STEPS, 0.3), "diff_loss": _series(rng, FLOW_STEPS, 0.3),
            "align_loss": np.zeros(FLOW_STEPS), "lr_flow": np.full(FLOW_STEPS, 5e-7)}
    times = rng.uniform(0.1, 0.3, VAE_STEPS + FLOW_STEPS)
    with MetricsLog(output, "vae_gan") as log:
        for i in range(25):
            log.log(i // 10, i % 10, i, {k: v[i] for k, v in vae.items()},
                    {"batch_time": times[i]})
    with MetricsLog(output, "vae_gan", resume_from_step=24) as log:
        for i in range(25, VAE_STEPS):
            log.log(i // 10, i % 10, i, {k: v[i] for k, v in vae.items()},
                    {"batch_time": times[i]})
    with MetricsLog(output, "flow") as log:
        for i in range(FLOW_STEPS):
            step = VAE_STEPS + i
            log.log(0, i, step, {k: v[i] for k, v in flow.items()}, {"batch_time": times[step]})
    written = write_graphs(output)
    return output, written, vae, flow, times


def _png_ok(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100
        assert image.info["dpi"] == pytest.approx((150, 150), abs=0.1)
        image.verify()


def test_every_graph_is_written_as_a_valid_png(run):
    output, written, *_ = run
    graph = output / "graph"
    expected = {f"{kind}_{step}.png" for step in ("vae_gan", "flow")
                for kind in ("training_losses", "learning_rates", "batch_times")}
    expected |= {"kl_vae_gan.png", "training_overview.png",
                 "training_summary_vae_gan.txt", "training_summary_flow.txt"}
    assert {path.name for path in written} == expected
    assert all(path.parent == graph for path in written)
    for path in written:
        if path.suffix == ".png":
            _png_ok(path)
    assert not list(graph.glob(".*.tmp"))  # atomic writes leave no temp file behind


def _summary_rows(path):
    """{name: [numbers or None for n/a]} for every table row of a summary."""
    rows = {}
    for line in path.read_text().splitlines():
        name, *cells = line.split() or [""]
        try:
            rows[name] = [None if cell == "n/a" else float(cell) for cell in cells]
        except ValueError:
            continue  # a title or header line
    return rows


def _expected(values):
    finite = values[np.isfinite(values)]
    change = (finite[-1] - finite[0]) / abs(finite[0]) * 100 if finite[0] else None
    return [finite[0], finite[-1], finite.min(), finite.max(), finite.mean(), finite.std(),
            change]


def _assert_row(row, expected):
    for got, want in zip(row, expected, strict=True):
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_summary_numbers_match_numpy(run):
    output, _, vae, flow, times = run
    rows = _summary_rows(output / "graph/training_summary_vae_gan.txt")
    for name in ("loss_recon", "loss_kl", "kl_beta", "loss_gen", "loss_disc", "r1_penalty"):
        _assert_row(rows[name], _expected(vae[name]))
    _assert_row(rows["batch_time"], _expected(times[:VAE_STEPS]))
    for name in ("lr_vae", "lr_disc"):
        _assert_row(rows[name], [vae[name][0], vae[name][-1]])
    flow_rows = _summary_rows(output / "graph/training_summary_flow.txt")
    for name in ("flow_loss", "diff_loss", "align_loss"):
        _assert_row(flow_rows[name], _expected(flow[name]))
    _assert_row(flow_rows["batch_time"], _expected(times[VAE_STEPS:]))
    text = (output / "graph/training_summary_vae_gan.txt").read_text()
    assert "resumed 1 time(s)" in text and f"records: {VAE_STEPS}" in text


def test_empty_single_and_torn_files_are_drawn_without_error(tmp_path):
    with MetricsLog(tmp_path, "single") as log:
        log.log(0, 0, 5, {"loss_recon": 0.5, "loss_kl": float("nan"), "lr_vae": 1e-4},
                {"batch_time": 1.0})
    with MetricsLog(tmp_path, ""):
        pass
    with open(tmp_path / "graph/training_metrics_single.jsonl", "ab") as handle:
        handle.write(b'{"timestamp": "20')
    names = {path.name for path in write_graphs(tmp_path)}
    assert names == {"training_losses_single.png", "learning_rates_single.png",
                     "batch_times_single.png", "training_summary_single.txt",
                     "training_summary.txt", "training_overview.png"}
    assert "records: 0" in (tmp_path / "graph/training_summary.txt").read_text()
    rows = _summary_rows(tmp_path / "graph/training_summary_single.txt")
    assert rows["loss_recon"] == [0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0]
    for name in ("training_losses_single.png", "training_overview.png"):
        _png_ok(tmp_path / "graph" / name)


def test_graphs_command_lists_the_files(tmp_path, capsys):
    with MetricsLog(tmp_path, "vae") as log:
        for step in range(3):
            log.log(0, step, step, {"loss_recon": 1.0 / (step + 1)})
    assert main(["graphs", str(tmp_path)]) == 0
    graph = tmp_path / "graph"
    assert capsys.readouterr().out.splitlines() == [
        str(graph / name) for name in ("training_losses_vae.png", "training_summary_vae.txt",
                                       "training_overview.png")]


def test_graphs_command_rejects_a_missing_directory_or_no_metrics(tmp_path, capsys):
    assert main(["graphs", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory" in err
    assert main(["graphs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no training_metrics" in err
