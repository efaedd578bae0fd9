"""The per-model optimizer/scheduler JSON file: merging rules and error reporting."""

from __future__ import annotations

import json

import pytest

from fluxflow_jax.training.optim_file import (MODELS, OptimSchedFileError,
                                              per_model_optimization, read_optim_sched_file)
from fluxflow_jax.training.optimizers import default_optimizer_config, make_optimizer
from fluxflow_jax.training.schedules import default_scheduler_config, make_schedule


def write(tmp_path, content) -> str:
    path = tmp_path / "optim.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_merging_follows_the_reference(tmp_path):
    content = read_optim_sched_file(write(tmp_path, {
        "optimizers": {"flow": {"type": "AdamW", "betas": [0.9, 0.98]},
                       "vae": {"type": "Adam", "lr": 3e-5}},
        "schedulers": {"vae": {"type": "CosineAnnealingLR"},
                       "flow": {"type": "StepLR", "step_size": 5}}}))
    merged = per_model_optimization(content, lr=1e-4, lr_min=0.02)
    assert set(merged.optimizers) == set(merged.schedulers) == set(MODELS)
    # In the file without lr: the run's lr. With lr: its own. Absent: the per-model default
    # with the run's lr (a tenth of it for the text encoder).
    assert merged.optimizers["flow"] == {"type": "AdamW", "betas": [0.9, 0.98], "lr": 1e-4}
    assert merged.optimizers["vae"] == {"type": "Adam", "lr": 3e-5}
    assert merged.optimizers["text_encoder"] == {**default_optimizer_config("text_encoder"),
                                                 "lr": 1e-5}
    assert merged.optimizers["discriminator"]["amsgrad"] is True
    # A cosine scheduler without eta_min_factor gets lr_min; other types are unchanged.
    assert merged.schedulers["vae"] == {"eta_min_factor": 0.02, "type": "CosineAnnealingLR"}
    assert merged.schedulers["flow"] == {"type": "StepLR", "step_size": 5}
    assert merged.schedulers["text_encoder"] == default_scheduler_config("text_encoder")
    for model in MODELS:  # everything merged is usable
        make_optimizer(merged.optimizers[model])
        make_schedule(merged.schedulers[model], merged.optimizers[model]["lr"], 100)


def test_no_file_gives_every_default_at_the_run_lr():
    merged = per_model_optimization(None, lr=2e-4)
    assert merged.optimizers["flow"]["type"] == "AdamW" and merged.optimizers["flow"]["lr"] == 2e-4
    assert merged.optimizers["text_encoder"]["lr"] == pytest.approx(2e-5)
    assert merged.schedulers == {m: default_scheduler_config(m) for m in MODELS}


def test_every_problem_is_reported_together(tmp_path):
    path = write(tmp_path, {
        "optimizer": {},
        "optimizers": {"vea": {"type": "AdamW"}, "flow": {"type": "Lion", "lr": -1}},
        "schedulers": {"vae": {"type": "Cosine"}, "flow": {"type": "StepLR", "gama": 0.5}}})
    with pytest.raises(OptimSchedFileError) as raised:
        read_optim_sched_file(path)
    message = str(raised.value)
    for expected in ["unknown section 'optimizer' (did you mean 'optimizers'?)",
                     "optimizers: unknown model 'vea' (did you mean 'vae'?)",
                     "optimizers.flow: 'lr': Learning rate must be positive",
                     "schedulers.vae: Unsupported scheduler: Cosine",
                     "schedulers.flow: unknown key 'gama' for StepLR (did you mean 'gamma'?)"]:
        assert expected in message
    assert message.startswith(path)


@pytest.mark.parametrize("content,message", [
    (None, "file not found"),
    ('{"optimizers": {\n  "vae": {"lr": 1e-4,}\n}}', "line 2: invalid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ({"schedulers": []}, "'schedulers' must be an object keyed by model"),
])
def test_unusable_files(tmp_path, content, message):
    path = str(tmp_path / "missing.json") if content is None else write(tmp_path, content)
    with pytest.raises(OptimSchedFileError, match=message):
        read_optim_sched_file(path)
