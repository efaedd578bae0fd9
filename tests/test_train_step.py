"""The jitted VAE-GAN and flow train steps: learning, routing, freezing, guards, EMA."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.models.bundle import FluxFlowModels
from fluxflow_jax.models.text_encoder import in_language_model
from fluxflow_jax.training.flow_step import FlowOptions
from fluxflow_jax.training.lpips import LPIPS
from fluxflow_jax.training.modes import part_metrics
from fluxflow_jax.training.state import (Networks, PackedState, new_train_state, split_models,
                                         viewing, write_to_models)
from fluxflow_jax.training.train_step import (StageConfig, StageConfigError, TrainStep,
                                              metric_names)
from fluxflow_jax.training.vae_step import VAEOptions, generator_outputs, generator_terms
from tiny import TINY
from tiny_steps import ADAM, CONSTANT, IMAGES, VAE_GAN

TEXT_BATCH = {"images": IMAGES, "input_ids": np.arange(16, dtype=np.int32).reshape(2, 8),
              "attention_mask": np.array([[1] * 8, [1] * 5 + [0] * 3], bool)}


def host_copy(tree):
    """A numpy snapshot: the step donates its input state."""
    return jax.tree.map(np.array, tree)


def assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def leaves_by_path(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def changed_fraction(before, after) -> float:
    a, b = leaves_by_path(before), leaves_by_path(after)
    return np.mean([not np.array_equal(a[k], b[k]) for k in a])


@pytest.fixture(scope="module")
def models():
    return FluxFlowModels.create(TINY, nnx.Rngs(0))


def run(step: TrainStep, models, batch, steps: int):
    state = step.init_state(models)
    initial = host_copy(state)
    history, snapshots = [], {}
    for k in range(steps):
        if k == steps - 1:
            snapshots["before_last"] = host_copy(state)
        state, metrics = step(state, batch, jax.random.key(k))
        history.append({name: float(v) for name, v in metrics.items()})
        if k == 0:
            snapshots["after_first"] = host_copy(state)
    return SimpleNamespace(step=step, initial=initial, final=host_copy(state), metrics=history,
                           **snapshots)


# --------------------------------------------------------------------------- VAE-GAN


@pytest.fixture(scope="module")
def vae_run(models):
    return run(TrainStep(models, VAE_GAN), models, {"images": IMAGES}, 30)


def test_vae_gan_reduces_reconstruction_loss_and_compiles_once(vae_run):
    recon = [m["loss_recon"] for m in vae_run.metrics]
    assert np.mean(recon[-5:]) < 0.75 * np.mean(recon[:5]), recon
    assert len(vae_run.step.compilations) == 1
    # Compiled with the CPU options (test_compiler.py): no convolution left to YNNPACK.
    assert "__ynn_fusion" not in vae_run.step.executable({"images": IMAGES}).as_text()
    assert all(m["skipped"] == 0 for m in vae_run.metrics)
    assert set(vae_run.metrics[0]) == set(metric_names(VAE_GAN))


def test_vae_gan_metrics_follow_the_schedule(vae_run):
    for n, m in enumerate(vae_run.metrics, start=1):
        assert (m["r1_penalty"] > 0) == (n % 4 == 0), n
        assert m["lr_vae"] == pytest.approx(2e-3)
        assert m["kl_beta"] == pytest.approx(1e-4 * np.sin(np.pi / 2 * min(n / 10, 1)) ** 2)
        assert 0 <= m["weight_gan"] <= 5 and m["weight_recon"] > 0 and m["weight_kl"] > 0
        assert m["loss_disc"] >= 0 and m["grad_norm_vae"] > 0
        assert m["lr_disc"] in (pytest.approx(2e-4 * 0.5**k) for k in range(30))
    assert vae_run.metrics[0]["loss_disc"] > 0 and vae_run.metrics[0]["grad_norm_disc"] > 0


def test_vae_gan_trains_both_players(vae_run):
    before, after = vae_run.initial, vae_run.final
    for name in ("compressor", "discriminator"):
        assert changed_fraction(before.params[name], after.params[name]) > 0.9, name
    assert changed_fraction(before.params["expander"], after.params["expander"]) > 0.9
    assert changed_fraction(before.buffers["discriminator"], after.buffers["discriminator"]) > 0.5
    assert int(after.step) == 30 and int(after.skipped) == 0


def test_discriminator_update_runs_two_power_iterations_on_the_old_weights(vae_run, models):
    """As the reference's two train-mode calls (real, then fake) do, before D's update."""
    reference = nnx.merge(*nnx.split(models.discriminator), copy=True)
    nnx.update(reference, vae_run.initial.params["discriminator"],
               vae_run.initial.buffers["discriminator"])
    reference.power_iteration()
    reference.power_iteration()
    expected = leaves_by_path(nnx.state(reference, nnx.Not(nnx.Param)))
    actual = leaves_by_path(vae_run.after_first.buffers["discriminator"])
    assert expected.keys() == actual.keys()
    for path in expected:
        np.testing.assert_allclose(actual[path], expected[path], rtol=1e-5, atol=1e-6,
                                   err_msg=path)


def test_vae_ema_follows_its_formula(vae_run):
    previous, final = vae_run.before_last, vae_run.final
    for name in ("compressor", "expander"):
        expected = jax.tree.map(lambda e, p: 0.999 * e + 0.001 * p, previous.ema[name],
                                final.params[name])
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9),
                     final.ema[name], expected)
    assert "discriminator" not in final.ema


def test_nan_batch_leaves_the_vae_gan_state_bitwise_unchanged(vae_run, models):
    # A committed copy (as the step keeps its state); the step may reuse donated memory.
    state = jax.device_put(jax.tree.map(np.copy, vae_run.final), jax.devices()[0])
    images = IMAGES.copy()
    images[1, 3, 4, 0] = np.nan
    new_state, metrics = vae_run.step(state, {"images": images}, jax.random.key(99))
    assert float(metrics["skipped"]) == 1
    new_state = host_copy(new_state)
    assert int(new_state.step) == 31 and int(new_state.skipped) == 1
    assert_same(new_state.replace(step=0, skipped=0), vae_run.final.replace(step=0, skipped=0))
    assert len(vae_run.step.compilations) == 1


def test_compressor_lr_scale_scales_the_compressors_first_update_only(vae_run, models):
    """The same first update as ``vae_run``'s, with the compressor's change halved; the
    expander, the discriminator and the reported learning rate are unchanged."""
    stage = dataclasses.replace(VAE_GAN, compressor_lr_scale=0.5)
    halved = run(TrainStep(models, stage), models, {"images": IMAGES}, 1)
    assert halved.metrics[0]["lr_vae"] == pytest.approx(2e-3)
    before = leaves_by_path(vae_run.initial.params["compressor"])
    full = leaves_by_path(vae_run.after_first.params["compressor"])
    half = leaves_by_path(halved.final.params["compressor"])
    assert np.mean([np.any(full[k] != before[k]) for k in before]) > 0.9
    for k, p in before.items():  # p + u/2 - p against (p + u - p) / 2: rounding of p apart
        np.testing.assert_allclose(half[k] - p, 0.5 * (full[k] - p), rtol=1e-5,
                                   atol=2 * np.spacing(np.abs(p).max()), err_msg=k)
    for name in ("expander", "discriminator"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9),
                     halved.final.params[name], vae_run.after_first.params[name])


# Frozen encoder and discriminator, SPADE off, LPIPS (random weights) on.
FROZEN = StageConfig(
    vae=VAEOptions(use_lpips=True, train_spade=False, r1_interval=1),
    frozen=frozenset({"compressor", "discriminator"}),
    optimizers={"vae": {"type": "AdamW", "lr": 1e-3}}, schedulers={"vae": CONSTANT},
    total_steps=3)


@pytest.fixture(scope="module")
def frozen_run(models):
    step = TrainStep(models, FROZEN, lpips=LPIPS(rngs=nnx.Rngs(3)))
    return run(step, models, {"images": IMAGES}, 3)


def test_frozen_components_are_bitwise_unchanged(frozen_run):
    before, after = frozen_run.initial, frozen_run.final
    for name in ("compressor", "discriminator"):
        assert_same(before.params[name], after.params[name])
    # The generator update never changes the discriminator, power-iteration vectors included.
    assert_same(before.buffers["discriminator"], after.buffers["discriminator"])
    assert set(after.opt_states) == {"vae"} and set(after.ema) == {"expander"}
    expander_before, expander_after = before.params["expander"], after.params["expander"]
    for block_before, block_after in zip(expander_before["upscale"].values(),
                                         expander_after["upscale"].values(), strict=True):
        assert_same(block_before["spade"], block_after["spade"])  # conditioning is off
        assert changed_fraction(block_before["upsample"], block_after["upsample"]) == 1
    for m in frozen_run.metrics:
        assert m["loss_lpips"] > 0 and m["loss_gen"] != 0
        assert m["loss_recon"] == pytest.approx(
            m["loss_l1"] + 0.1 * m["loss_mse"] + 0.1 * m["loss_lpips"])
        assert m["loss_disc"] == 0 and m["grad_norm_disc"] == 0 and m["lr_disc"] == 0


@pytest.fixture(scope="module")
def generator_gradients(models):
    """d loss_gen / d params and d loss_recon / d params through the step's forward pass,
    for reconstruction on and for GAN-only mode."""
    nets = Networks.from_models(models)
    params, buffers = split_models(models)

    def gradients(options):
        names = ("gan", "recon") if options.train_reconstruction else ("gan",)

        def terms(p):
            outputs = generator_outputs(options, nets, p, buffers, IMAGES, jax.random.key(0))
            disc = nets.bind("discriminator", params, buffers)
            values = generator_terms(options, outputs, IMAGES, disc, None)
            return jnp.stack([values[name] for name in names])

        jacobian = jax.jit(jax.jacrev(terms))(params)  # one forward, a backward per term
        return {name: jax.tree.map(lambda g, i=i: g[i], jacobian)
                for i, name in enumerate(names)}

    return {mode: host_copy(gradients(VAEOptions(use_lpips=False, train_reconstruction=mode)))
            for mode in (True, False)}


def nonzero_fraction(tree) -> float:
    return np.mean([np.any(leaf != 0) for leaf in leaves_by_path(tree).values()])


def test_gan_gradient_reaches_the_decoder_only_while_reconstruction_trains(
        generator_gradients):
    grads = generator_gradients[True]
    assert all(np.all(g == 0) for g in leaves_by_path(grads["gan"]["compressor"]).values())
    assert nonzero_fraction(grads["gan"]["expander"]) > 0.5
    assert nonzero_fraction(grads["recon"]["compressor"]) > 0.9
    assert nonzero_fraction(grads["recon"]["expander"]) > 0.5


def test_gan_only_mode_trains_the_encoder_adversarially(generator_gradients):
    grads = generator_gradients[False]
    assert nonzero_fraction(grads["gan"]["compressor"]) > 0.9
    assert nonzero_fraction(grads["gan"]["expander"]) > 0.5


# --------------------------------------------------------------------------- 0.8.1 switches


IMAGE_STATISTICS = ("colorstats", "histogram", "contrast", "coarseness")


@pytest.fixture(scope="module")
def switched_runs(models):
    """One update from the same state and key, with the KL term off, without and with
    every image-statistics term."""
    def stage(on: bool) -> StageConfig:
        switches = {f"train_{name}": on for name in IMAGE_STATISTICS}
        return StageConfig(vae=VAEOptions(use_gan=False, use_lpips=False, train_kl=False,
                                          **switches),
                           optimizers={"vae": ADAM}, schedulers={"vae": CONSTANT})

    return {on: run(TrainStep(models, stage(on)), models, {"images": IMAGES}, 1)
            for on in (False, True)}


def test_loss_switches_turn_terms_and_their_metrics_on_and_off(switched_runs):
    off, on = switched_runs[False], switched_runs[True]
    for result in (off, on):
        assert set(result.metrics[0]) == set(metric_names(result.step.stage))
        assert "loss_kl" not in result.metrics[0] and "kl_beta" not in result.metrics[0]
        assert result.metrics[0]["weight_kl"] == 0
    assert not any(f"loss_{name}" in off.metrics[0] for name in IMAGE_STATISTICS)
    assert all(on.metrics[0][f"loss_{name}"] > 0 for name in IMAGE_STATISTICS)
    # The same forward pass; the terms change the gradient and so the update.
    assert on.metrics[0]["loss_recon"] == off.metrics[0]["loss_recon"]
    assert on.metrics[0]["grad_norm_vae"] != off.metrics[0]["grad_norm_vae"]
    for component in ("compressor", "expander"):  # measured: 1.0 and 0.83 of the leaves
        assert changed_fraction(off.final.params[component], on.final.params[component]) > 0.5
    assert_same(off.final.loss_history, on.final.loss_history)  # not balanced adaptively


def test_image_statistics_terms_need_the_reconstruction():
    options = VAEOptions(train_reconstruction=False, train_colorstats=True)
    assert options.regularisers == ()
    assert "loss_colorstats" not in part_metrics("vae", options)


def test_alternate_spade_conditions_the_even_batches(models):
    """``spade_training_mode: alternate`` decodes batch 1, 3, ... as without SPADE and
    batch 2, 4, ... as with it (batches counted from 1 over the run, as the reference)."""
    nets = Networks.from_models(models)
    params, buffers = split_models(models)

    def recon(options, batch_number=None):
        return generator_outputs(options, nets, params, buffers, IMAGES, jax.random.key(0),
                                 batch_number=batch_number)["recon"]

    with_spade = recon(VAEOptions(use_gan=False))
    without = recon(VAEOptions(use_gan=False, train_spade=False))
    assert np.abs(with_spade - without).max() > 1e-3
    alternate = jax.jit(lambda n: recon(VAEOptions(use_gan=False,
                                                   spade_training_mode="alternate"), n))
    for batch_number, expected in ((1, without), (2, with_spade), (3, without),
                                   (4, with_spade)):
        np.testing.assert_allclose(alternate(jnp.asarray(batch_number)), expected,
                                   rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- flow


FLOW = StageConfig(flow=FlowOptions(), optimizers={"flow": ADAM, "text_encoder": ADAM},
                   schedulers={"flow": CONSTANT, "text_encoder": CONSTANT}, total_steps=40)


@pytest.fixture(scope="module")
def flow_run(models):
    return run(TrainStep(models, FLOW), models, TEXT_BATCH, 40)


def held_out_flow_loss(flow_run, state, keys=range(100, 108)) -> float:
    """The flow loss of ``state`` on the training batch at timesteps and noise no training
    step drew: the same for every state, so the comparison is not lost in their spread (the
    v060 latents are bounded, so the loss starts near 1 and varies as much as it falls)."""
    losses = [flow_run.step(jax.device_put(jax.tree.map(np.copy, state), jax.devices()[0]),
                            TEXT_BATCH, jax.random.key(k))[1]["diff_loss"] for k in keys]
    return float(np.mean(losses))


def test_flow_reduces_its_loss_and_compiles_once(flow_run):
    before = held_out_flow_loss(flow_run, flow_run.initial)
    after = held_out_flow_loss(flow_run, flow_run.final)
    assert after < 0.9 * before, (before, after)
    assert len(flow_run.step.compilations) == 1
    assert set(flow_run.metrics[0]) == set(metric_names(FLOW))
    for m in flow_run.metrics:
        assert m["flow_loss"] == m["diff_loss"] and m["align_loss"] == 0
        assert m["grad_norm_flow"] > 0 and m["grad_norm_text"] > 0
        assert m["lr_flow"] == pytest.approx(2e-3) and m["pred_std"] > 0


def test_flow_step_with_the_0_8_1_options(models, flow_run):
    """A timestep window, timestep-scaled text dropout and the 0.8.1 loss reach the step:
    the same first batch and key as ``flow_run`` give another finite loss."""
    options = FlowOptions(num_train_timesteps=100, start_step=60, cfg_dropout_prob=0.3,
                          cfg_dropout_schedule="timestep", flow_loss="smooth_l1")
    stage = StageConfig(flow=options, optimizers=FLOW.optimizers, schedulers=FLOW.schedulers)
    [metrics] = run(TrainStep(models, stage), models, TEXT_BATCH, 1).metrics
    assert set(metrics) == set(metric_names(stage)) and metrics["skipped"] == 0
    assert np.isfinite(metrics["diff_loss"]) and metrics["grad_norm_flow"] > 0
    assert metrics["diff_loss"] != flow_run.metrics[0]["diff_loss"]


def test_flow_trains_flow_and_text_encoder_only(flow_run):
    before, after = flow_run.initial, flow_run.final
    assert changed_fraction(before.params["flow_processor"], after.params["flow_processor"]) > 0.9
    assert changed_fraction(before.params["text_encoder"], after.params["text_encoder"]) > 0.9
    for name in ("compressor", "expander", "discriminator"):
        assert_same(before.params[name], after.params[name])
    assert_same(before.buffers, after.buffers)


def test_flow_ema_follows_its_formula(flow_run):
    previous, final = flow_run.before_last, flow_run.final
    assert set(final.ema) == {"flow_processor", "text_encoder"}
    for name in final.ema:
        expected = jax.tree.map(lambda e, p: 0.9999 * e + 0.0001 * p, previous.ema[name],
                                final.params[name])
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9),
                     final.ema[name], expected)


def test_nan_batch_leaves_the_flow_state_bitwise_unchanged(flow_run):
    # A committed copy (as the step keeps its state); the step may reuse donated memory.
    state = jax.device_put(jax.tree.map(np.copy, flow_run.final), jax.devices()[0])
    batch = dict(TEXT_BATCH, images=np.where(IMAGES > 0.7, np.inf, IMAGES))
    new_state, metrics = flow_run.step(state, batch, jax.random.key(7))
    assert float(metrics["skipped"]) == 1
    new_state = host_copy(new_state)
    assert int(new_state.skipped) == 1
    assert_same(new_state.replace(step=0, skipped=0), flow_run.final.replace(step=0, skipped=0))


def test_packed_state_steps_as_the_tree_does_and_must_match_its_structure(flow_run):
    """The loop's fast path (flat leaves in and out) runs the same program: bitwise equal."""
    def committed():
        return jax.device_put(jax.tree.map(np.copy, flow_run.final), jax.devices()[0])

    tree, packed = committed(), PackedState.pack(committed())
    for k in range(2):
        tree, _ = flow_run.step(tree, TEXT_BATCH, jax.random.key(k))
        packed, _ = flow_run.step(packed, TEXT_BATCH, jax.random.key(k))
    assert isinstance(packed, PackedState) and len(flow_run.step.compilations) == 1
    assert_same(host_copy(packed.unpack()), host_copy(tree))
    other = PackedState.pack(committed().replace(ema={}))
    with pytest.raises(ValueError, match="structure"):
        flow_run.step(other, TEXT_BATCH, jax.random.key(0))


def test_a_handed_over_state_copies_only_the_arrays_two_leaves_share(models):
    """After a flow stage, the VAE-GAN stage starts its encoder average from the encoder's
    weights: the average gets its own buffers (a step donates every leaf, and one buffer
    cannot be donated twice), while the handed-over weights are not copied."""
    def buffer(array):
        return array.unsafe_buffer_pointer()

    previous = TrainStep(models, FLOW).init_state(models)
    step = TrainStep(models, VAE_GAN)
    state = step.init_state(models, previous=previous)
    averages, weights = (jax.tree.leaves(tree["compressor"]) for tree in (state.ema,
                                                                          state.params))
    assert all(buffer(a) != buffer(w) and np.array_equal(a, w)
               for a, w in zip(averages, weights))
    assert list(map(buffer, jax.tree.leaves(state.params))) == \
        list(map(buffer, jax.tree.leaves(previous.params)))
    state, metrics = step(state, {"images": IMAGES}, jax.random.key(0))
    assert float(metrics["skipped"]) == 0 and int(state.step) == 1


def test_vae_and_flow_in_one_stage_with_a_frozen_text_encoder(models):
    """Both updates on each batch (the flow reads the freshly updated encoder). The text
    encoder is frozen: not differentiated, unchanged. Every caption is dropped for
    classifier-free guidance, so the alignment term sees zero text and equals 1."""
    stage = StageConfig(vae=VAEOptions(use_gan=False, use_lpips=False),
                        flow=FlowOptions(lambda_align=0.5, cfg_dropout_prob=0.999),
                        frozen=frozenset({"text_encoder"}),
                        optimizers={"vae": ADAM, "flow": ADAM},
                        schedulers={"vae": CONSTANT, "flow": CONSTANT}, total_steps=2)
    step = TrainStep(models, stage)
    assert step.alignment_active
    result = run(step, models, TEXT_BATCH, 2)
    before, after = result.initial, result.final
    assert_same(before.params["text_encoder"], after.params["text_encoder"])
    assert_same(before.params["discriminator"], after.params["discriminator"])
    for name in ("compressor", "flow_processor"):
        assert changed_fraction(before.params[name], after.params[name]) > 0.9, name
    assert set(after.opt_states) == {"vae", "flow"}
    assert set(after.ema) == {"compressor", "expander", "flow_processor"}
    assert set(result.metrics[0]) == set(metric_names(stage))
    for m in result.metrics:
        assert m["align_loss"] == pytest.approx(1.0)
        assert m["flow_loss"] == pytest.approx(m["diff_loss"] + 0.5)
        assert m["grad_norm_text"] == 0 and m["lr_text"] == 0
        assert m["loss_gen"] == 0 and m["loss_disc"] == 0 and m["weight_gan"] == 0
        assert m["loss_recon"] == pytest.approx(m["loss_l1"] + 0.1 * m["loss_mse"])


def test_a_frozen_language_model_trains_only_the_text_encoders_head(models):
    """``language_model`` frozen: DistilBERT's weights stay bitwise, hold no optimizer
    state and are not differentiated; the head and the flow train."""
    stage = StageConfig(flow=FlowOptions(), frozen=frozenset({"language_model"}),
                        optimizers={"flow": ADAM, "text_encoder": ADAM},
                        schedulers={"flow": CONSTANT, "text_encoder": CONSTANT}, total_steps=2)
    result = run(TrainStep(models, stage), models, TEXT_BATCH, 2)
    before, after = result.initial.params["text_encoder"], result.final.params["text_encoder"]
    head = [name for name in before if not in_language_model((name,))]
    assert sorted(head) == ["head_norm1", "head_norm2", "head_proj1", "head_proj2"]
    for name in before:
        if name in head:
            assert changed_fraction(before[name], after[name]) == 1, name
        else:
            assert_same(before[name], after[name])
    assert changed_fraction(result.initial.params["flow_processor"],
                            result.final.params["flow_processor"]) > 0.9
    head_size = sum(np.size(leaf) for name in head for leaf in jax.tree.leaves(before[name]))
    moments = sum(np.size(leaf) for leaf in
                  jax.tree.leaves(result.final.opt_states["text_encoder"]))
    assert 2 * head_size <= moments < 2 * head_size + 100  # Adam's two, for the head only
    assert all(m["grad_norm_text"] > 0 for m in result.metrics)
    # The average holds the head only; the averaged weights pair it with DistilBERT as it is.
    average = result.final.ema["text_encoder"]
    assert sorted(average) == head
    fresh = FluxFlowModels.create(TINY, nnx.Rngs(1))  # the module-wide models stay as they are
    on_device = jax.tree.map(jnp.asarray, result.final)
    averaged = nnx.state(write_to_models(on_device, fresh, ema=True).text_encoder, nnx.Param)
    for name in before:
        assert_same(averaged[name], average[name] if name in head else after[name])


@pytest.mark.parametrize("frozen, dropout", [(frozenset(), True),
                                             (frozenset({"language_model"}), False)])
def test_text_dropout_only_where_the_language_model_trains(models, frozen, dropout):
    """A frozen language model gives the features it gives at inference: its dropout is
    off (the head has none), so the step's text encoder ignores the dropout key."""
    stage = StageConfig(flow=FlowOptions(), frozen=frozen,
                        optimizers={"flow": ADAM, "text_encoder": ADAM},
                        schedulers={"flow": CONSTANT, "text_encoder": CONSTANT})
    networks = TrainStep(models, stage).networks
    params, buffers = split_models(models)
    encoder = networks.bind("text_encoder", params, buffers)
    ids, mask = TEXT_BATCH["input_ids"], TEXT_BATCH["attention_mask"]
    first, second = (encoder(ids, mask, rngs=nnx.Rngs(dropout=seed)) for seed in (0, 1))
    assert (not np.allclose(first, second)) == dropout


def test_alignment_with_mismatched_widths_warns_once_and_is_off():
    config = TINY.replace(text_embed_dim=24)
    models = FluxFlowModels.create(config, nnx.Rngs(0),
                                   components=("compressor", "flow_processor", "text_encoder"))
    with pytest.warns(UserWarning, match="lambda_align=0.1 is ignored") as warned:
        step = TrainStep(models, StageConfig(flow=FlowOptions(lambda_align=0.1)))
    assert len(warned) == 1 and not step.alignment_active


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("stage, lpips, message", [
    (StageConfig(), None, "trains nothing"),
    (StageConfig(vae=VAEOptions(use_lpips=False), frozen=frozenset({"decoder"})), None,
     "cannot freeze unknown component 'decoder'"),
    (StageConfig(vae=VAEOptions()), None, "no LPIPS network"),
    (StageConfig(vae=VAEOptions(use_lpips=False), optimizers={"vea": ADAM}), None,
     "unknown optimizer group 'vea' (did you mean 'vae'?)"),
    (StageConfig(vae=VAEOptions(use_lpips=False, kl_reduction="avg", r1_interval=0)), None,
     "vae: 'kl_reduction' must be one of ['sum', 'mean'], got 'avg'"),
    (StageConfig(vae=VAEOptions(use_lpips=False), total_steps=0,
                 optimizers={"vae": {"type": "AdamW", "lr": -1}},
                 schedulers={"vae": {"type": "StepLR", "gamma": 2}}), None,
     "optimizers.vae: 'lr': Learning rate must be positive"),
    (StageConfig(flow=FlowOptions(cfg_dropout_prob=1.0)), None, "cfg_dropout_prob"),
    (StageConfig(flow=FlowOptions(), compressor_lr_scale=0.05), None,
     "compressor_lr_scale (0.05) scales the compressor's updates, which this step does not "
     "train"),
    (StageConfig(vae=VAEOptions(use_lpips=False), compressor_lr_scale=-1), None,
     "'compressor_lr_scale' must be a number in [0, inf), got -1"),
])
def test_invalid_stages_are_reported(models, stage, lpips, message):
    with pytest.raises(StageConfigError) as raised:
        TrainStep(models, stage, lpips=lpips)
    assert message in str(raised.value)


def test_missing_components_are_named():
    vae_only = FluxFlowModels.create(TINY, nnx.Rngs(0), components=("compressor", "expander"))
    with pytest.raises(StageConfigError, match="needs the discriminator"):
        TrainStep(vae_only, StageConfig(vae=VAEOptions(use_lpips=False)))


def test_batch_problems_are_named_before_any_model_runs(models):
    step = TrainStep(models, StageConfig(vae=VAEOptions(use_gan=False, use_lpips=False),
                                         flow=FlowOptions()))
    state = step.init_state(models)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"lacks \['input_ids', 'attention_mask'\]"):
        step(state, {"images": IMAGES}, key)
    with pytest.raises(ValueError, match=r"must be \[B, H, W, 3\] \(NHWC\), got shape"):
        step(state, dict(TEXT_BATCH, images=IMAGES.transpose(0, 3, 1, 2)), key)
    with pytest.raises(ValueError, match="30x32 must have sides divisible by 4"):
        step(state, dict(TEXT_BATCH, images=IMAGES[:, :30]), key)


def test_viewing_lends_the_states_own_weights_and_gives_the_old_ones_back():
    """Samples and validation read the state's arrays without copying them; the models
    then hold their earlier weights again, since the next step donates the state's."""
    models = FluxFlowModels.create(TINY, nnx.Rngs(2))
    before = jax.tree.map(np.asarray, nnx.state(models.flow_processor, nnx.Param))
    state = new_train_state(models, {})
    state = state.replace(params={**state.params, "flow_processor": jax.tree.map(
        lambda p: p + 1, state.params["flow_processor"])})
    with viewing(state, models) as lent:
        inside = jax.tree.leaves(nnx.state(lent.flow_processor, nnx.Param))
        assert all(a is b for a, b in zip(inside, jax.tree.leaves(
            state.params["flow_processor"]), strict=True))
    jax.tree.map(np.testing.assert_array_equal,
                 nnx.state(models.flow_processor, nnx.Param), before)
