"""The modes table says what the train step does: for stages that turn rows on and off, the
metrics the traced step returns and the optimizer groups it builds are the table's."""

import jax
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.training import StageConfig, StageConfigError, TrainStep, VAEOptions
from fluxflow_jax.training.flow_step import FlowOptions
from fluxflow_jax.training.modes import MODES, metric_names
from tiny import TINY
from tiny_steps import IMAGES

BATCH = {"images": IMAGES, "input_ids": np.arange(16, dtype=np.int32).reshape(2, 8),
         "attention_mask": np.ones((2, 8), bool)}
STATISTICS = {f"train_{name}": True for name in ("colorstats", "histogram", "contrast",
                                                  "coarseness")}
CASES = {  # stage -> the rows it turns on, written out by hand
    "vae_gan_statistics": (StageConfig(vae=VAEOptions(use_lpips=False, **STATISTICS)),
                           {"vae", "reconstruction", "kl", "gan", "colorstats", "histogram",
                            "contrast", "coarseness", "step"}),
    "gan_only_without_kl": (StageConfig(vae=VAEOptions(train_reconstruction=False,
                                                       train_kl=False, use_lpips=False)),
                            {"vae", "gan", "step"}),
    "flow": (StageConfig(flow=FlowOptions()), {"flow", "step"}),
    "reconstruction_and_flow": (StageConfig(vae=VAEOptions(use_gan=False, use_lpips=False),
                                            flow=FlowOptions()),
                                {"vae", "reconstruction", "kl", "flow", "step"}),
}


@pytest.fixture(scope="module")
def models():
    return FluxFlowModels.create(TINY, nnx.Rngs(0))


@pytest.mark.parametrize("case", CASES)
def test_the_step_reports_and_trains_what_the_table_says(models, case):
    stage, rows = CASES[case]
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


def test_every_row_is_exercised(models):
    assert set().union(*(rows for _, rows in CASES.values())) == set(MODES) - {"lpips"}
    # The LPIPS row reports nothing of its own: it needs the network.
    assert MODES["lpips"].lpips and not MODES["lpips"].metrics
    with pytest.raises(StageConfigError, match="use_lpips is on but no LPIPS network"):
        TrainStep(models, StageConfig(vae=VAEOptions(use_lpips=True)))
