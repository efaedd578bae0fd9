"""The modes table says what the train step does: for stages that turn rows on and off, the
metrics the traced step returns and the optimizer groups it builds are the table's; the
progress line, the sample images and the run's plan follow the same rows."""

import jax
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.pipeline.config import load_config
from fluxflow_jax.pipeline.console import progress_line
from fluxflow_jax.pipeline.hooks.console import console_losses
from fluxflow_jax.pipeline.plan import check_run
from fluxflow_jax.pipeline.samples import Samples
from fluxflow_jax.training import StageConfig, StageConfigError, TrainStep, VAEOptions
from fluxflow_jax.training.flow_step import FlowOptions
from fluxflow_jax.training.modes import MODES, losses, metric_names, shown
from pipeline_helpers import write_config
from tiny import TINY
from tiny_steps import IMAGES

BATCH = {"images": IMAGES, "input_ids": np.arange(16, dtype=np.int32).reshape(2, 8),
         "attention_mask": np.ones((2, 8), bool)}
STATISTICS = {f"train_{name}": True for name in ("colorstats", "histogram", "contrast",
                                                  "coarseness")}
CASES = {  # stage -> the rows it turns on and the progress line's labels, written by hand
    "vae_gan_statistics": (StageConfig(vae=VAEOptions(use_lpips=False, **STATISTICS)),
                           {"vae", "reconstruction", "kl", "gan", "colorstats", "histogram",
                            "contrast", "coarseness", "spade", "step"},
                           ["VAE", "KL", "G", "D"]),
    "gan_only_without_kl": (StageConfig(vae=VAEOptions(train_reconstruction=False,
                                                       train_kl=False, use_lpips=False)),
                            {"vae", "gan", "spade", "step"}, ["G", "D"]),
    "flow": (StageConfig(flow=FlowOptions()), {"flow", "step"}, ["Flow"]),
    "reconstruction_and_flow": (StageConfig(vae=VAEOptions(use_gan=False, use_lpips=False),
                                            flow=FlowOptions()),
                                {"vae", "reconstruction", "kl", "spade", "flow", "step"},
                                ["VAE", "KL", "Flow"]),
}


@pytest.fixture(scope="module")
def models():
    return FluxFlowModels.create(TINY, nnx.Rngs(0))


@pytest.mark.parametrize("case", CASES)
def test_the_step_reports_and_trains_what_the_table_says(models, case):
    stage, rows, labels = CASES[case]
    step = TrainStep(models, stage)
    lowered = step.lower(step.init_state(models), BATCH, jax.random.key(0))
    _, metrics = lowered.out_info
    assert set(metrics) == {m for row in rows for m in MODES[row].metrics}
    assert len(metric_names(stage.vae, stage.flow)) == len(metrics)  # no name twice
    groups: dict[str, set[str]] = {}
    for row in rows:
        for group, components in MODES[row].groups.items():
            groups.setdefault(group, set()).update(components)
    assert {g: set(cs) for g, cs in step.stage.group_components().items()} == groups
    assert set(step.groups) == set(groups)
    # The progress line shows losses the step reports, under the labels of its rows.
    assert {metric for _, metric in shown(stage.vae, stage.flow)} <= set(metrics)
    averages = {metric: float(i) for i, metric in enumerate(sorted(metrics))}
    assert list(console_losses(stage, averages)) == labels


def test_every_row_is_exercised(models):
    assert set().union(*(rows for _, rows, _ in CASES.values())) == set(MODES) - {"lpips"}
    # The LPIPS row reports nothing of its own: it needs the network.
    assert MODES["lpips"].lpips and not MODES["lpips"].metrics
    with pytest.raises(StageConfigError, match="use_lpips is on but no LPIPS network"):
        TrainStep(models, StageConfig(vae=VAEOptions(use_lpips=True)))


def test_every_shown_loss_is_a_metric_of_its_part():
    for name, mode in MODES.items():
        reported = {m for row in MODES.values() if row.part in (mode.part, None)
                    for m in row.metrics}
        assert {metric for _, metric in mode.shown} <= reported, name
    labels = [label for mode in MODES.values() for label, _ in mode.shown]
    assert len(labels) == len(set(labels))  # one label, one loss


def test_the_progress_line_of_a_vae_gan_stage():
    """The reference's labels and order; metrics not averaged yet and others are left out."""
    stage = StageConfig(vae=VAEOptions())
    averages = {"loss_recon": 0.0234, "loss_kl": 12.45, "loss_gen": 0.156, "loss_disc": 0.089,
                "loss_lpips": 0.0812, "grad_norm_vae": 3.0, "flow_loss": 1.0}
    line = progress_line(923.123, "vae_gan", 2, 3, 5, 20, 127, 500,
                         console_losses(stage, averages), 3.2)
    assert line == ("[0000:15:23.123] Step vae_gan (2/3) | Epoch 5/20 | Batch 127/500 | "
                    "VAE: 0.0234 | KL: 12.4500 | G: 0.1560 | D: 0.0890 | LPIPS: 0.0812 | "
                    "3.20s/batch")
    del averages["loss_gen"], averages["loss_lpips"]
    assert list(console_losses(stage, averages)) == ["VAE", "KL", "D"]


def test_the_plan_describes_each_active_loss_in_the_table_order():
    vae = VAEOptions(train_spade=False, train_contrast=True, kl_warmup_steps=10)
    flow = FlowOptions(lambda_align=0.5, num_train_timesteps=500)
    assert losses(vae, flow) == [
        "reconstruction (L1 + 0.1·MSE + 0.1·LPIPS)", "KL (beta 0.0001, warm-up 10 updates)",
        "GAN (lambda_adv 0.1, R1 5.0 every 16)", "0.1·contrast", "SPADE off",
        "flow v-prediction + 0.5·alignment", "timesteps 0..499 of 500"]
    # Without reconstruction there is no reconstruction term nor image statistic.
    assert losses(VAEOptions(train_reconstruction=False, use_gan=False, train_contrast=True),
                  None) == ["KL (beta 0.0001, warm-up 5000 updates)"]


def test_samples_show_what_the_stage_trains(tmp_path):
    """A flow-only stage writes text-to-image samples and no reconstruction; a stage that
    trains both parts writes both."""
    config = load_config(write_config(
        tmp_path, [{"name": "flow", "n_epochs": 1, "train_diff": True},
                   {"name": "both", "n_epochs": 1, "train_vae": True, "train_diff": True}],
        output={"no_samples": False, "sample_sizes": [32], "sample_steps": 1,
                "sample_captions": ["a red circle"]}))
    plan = check_run(config)
    assert plan.problems == []
    samples = Samples(config, plan.loader, plan.model)
    models = FluxFlowModels.create(plan.model, nnx.Rngs(0))
    written = {stage.label: sorted(path.name for path in samples.write(models, stage, 1, 2))
               for stage in plan.stages}
    assert written == {
        "flow": ["sample_flow_epoch_1_batch_2_32x32.png"],
        "both": ["sample_both_epoch_1_batch_2_32x32.png", "sample_both_epoch_1_batch_2_vae.png"]}
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == sorted(
        name for names in written.values() for name in names)
