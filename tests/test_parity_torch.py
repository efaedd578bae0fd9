"""Numerical parity with the real PyTorch ``fluxflow`` 0.8.1, in every architecture version.

Same (perturbed, non-default) weights, same inputs, same injected noise. float64 must agree
to 1e-6 relative (it does to ~1e-12); float32 within ref.FLOAT32_TOL, see its comment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import torch
from fluxflow.models.activations import BezierActivation as TorchBezier
from fluxflow.models.activations import TrainableBezier as TorchTrainableBezier
from fluxflow.models.conditioning import SPADE as TorchSPADE
from fluxflow.models.conditioning import ContextAttentionMixer as TorchMixer
from fluxflow.models.conditioning import GatedContextInjection as TorchGated
from fluxflow.models.v070.conditioning import SPADE as TorchSPADE070
from flax import nnx

import torch_reference as ref
from fluxflow_jax.interop import component_from_tensors
from fluxflow_jax.interop.keymap import CONV, CONV_TRANSPOSE, LINEAR, Entry
from fluxflow_jax.interop.state import import_tensors
from fluxflow_jax.models import layers
from fluxflow_jax.models import (SPADE, ContextAttentionMixer, FluxFlowConfig,
                                 GatedContextInjection, TrainableBezier, bezier_activation)

@pytest.fixture(params=list(ref.PRECISIONS))
def precision(request):
    torch_dtype, jax_dtype, tol = ref.PRECISIONS[request.param]
    with jax.enable_x64(jax_dtype == jnp.float64):
        yield torch_dtype, jax_dtype, tol


@pytest.fixture(scope="module", params=[(name, version) for version in ref.VERSIONS
                                        for name in ref.CONFIGS],
                ids=lambda param: f"{param[0]}-v{param[1].replace('.', '')}")
def case(request):
    name, version = request.param
    cfg, image_shape = ref.CONFIGS[name]
    cfg = cfg.replace(model_version=version)
    return cfg, image_shape, ref.pipeline(cfg, seed=len(name) + ord(name))


def _component(name, cfg, torch_module, jax_dtype):
    return component_from_tensors(name, cfg, ref.state_numpy(torch_module), dtype=jax_dtype)


def test_compressor(case, precision):
    cfg, image_shape, pipe = case
    torch_dtype, jax_dtype, tol = precision
    images, noise, _, _ = ref.inputs(cfg, image_shape, torch_dtype)
    torch_model = ref.cast(pipe.compressor, torch_dtype)
    ref.inject_noise(torch_model, noise)
    with torch.no_grad():
        packed, mu, logvar = torch_model(images, training=True)
    model = _component("compressor", cfg, torch_model, jax_dtype)
    encode = nnx.jit(lambda m, x, eps: m.encode(x, noise=eps))
    encoded = encode(model, ref.to_jax(images, jax_dtype, True), ref.to_jax(noise, jax_dtype, True))
    assert encoded.packed.dtype == jax_dtype
    assert ref.relative_error(encoded.packed, packed) <= tol
    assert ref.relative_error(encoded.mu, ref.nchw(mu)) <= tol
    assert ref.relative_error(encoded.logvar, ref.nchw(logvar)) <= tol


def test_flow_processor(case, precision):
    cfg, image_shape, pipe = case
    torch_dtype, jax_dtype, tol = precision
    _, _, text, t = ref.inputs(cfg, image_shape, torch_dtype)
    packed = ref.packed_latents(cfg, image_shape, torch_dtype)
    torch_model = ref.cast(pipe.flow_processor, torch_dtype)
    with torch.no_grad():
        expected = torch_model(packed, text, t)
    model = _component("flow_processor", cfg, torch_model, jax_dtype)
    hw = ref.grid(packed, cfg)
    flow = nnx.jit(lambda m, x, e, t: m(x, e, t, hw=hw))
    actual = flow(model, ref.to_jax(packed, jax_dtype), ref.to_jax(text, jax_dtype),
                  ref.to_jax(t, jax_dtype))
    assert ref.relative_error(actual, expected) <= tol


@pytest.mark.parametrize("t,grid_scale", [(0.0, 1), (1.0, 1), (0.5, 2)],
                         ids=["t0", "t1", "grid_larger_than_tokens"])
def test_flow_processor_edge_cases(case, t, grid_scale):
    """Batch of one, both ends of the time range, and an hw token announcing more tokens
    than the sequence holds (the side branch then falls back to a square-ish grid)."""
    cfg, image_shape, pipe = case
    with jax.enable_x64(True):
        packed = ref.packed_latents(cfg, image_shape, torch.float64)[:1]
        packed[:, -1, :2] *= grid_scale
        text = torch.randn(1, cfg.text_embed_dim, dtype=torch.float64)
        times = torch.tensor([t], dtype=torch.float64)
        torch_model = ref.cast(pipe.flow_processor, torch.float64)
        model = _component("flow_processor", cfg, torch_model, jnp.float64)
        run = lambda: model(ref.to_jax(packed, jnp.float64), ref.to_jax(text, jnp.float64),
                            ref.to_jax(times, jnp.float64))
        tokens = packed.shape[1] - 1
        if grid_scale > 1 and tokens % int(tokens**0.5):  # the reference fails too
            with pytest.raises(Exception):
                torch_model(packed, text, times)
            with pytest.raises(ValueError, match="do not form a grid"):
                run()
            return
        with torch.no_grad():
            expected = torch_model(packed, text, times)
        assert ref.relative_error(run(), expected) <= ref.FLOAT64_TOL


@pytest.mark.parametrize("use_context", [True, False])
def test_expander(case, precision, use_context):
    cfg, image_shape, pipe = case
    torch_dtype, jax_dtype, tol = precision
    packed = ref.packed_latents(cfg, image_shape, torch_dtype)
    packed[:, :-1] *= 0.5  # tokens only: the hw token must keep the grid size
    torch_model = ref.cast(pipe.expander, torch_dtype)
    with torch.no_grad():
        expected = torch_model(packed, use_context=use_context)
    model = _component("expander", cfg, torch_model, jax_dtype)
    hw = ref.grid(packed, cfg)
    actual = nnx.jit(lambda m, x: m(x, use_context=use_context, hw=hw))(
        model, ref.to_jax(packed, jax_dtype))
    assert actual.shape == (image_shape[0], *image_shape[1:], cfg.in_channels)
    assert ref.relative_error(actual, ref.nchw(expected)) <= tol


@pytest.mark.parametrize("kernel,stride,padding", [(16, 2, 7), (4, 2, 1), (2, 2, 0),
                                                    (7, 3, 2), (3, 1, 1)])
def test_conv_transpose_phases_match_torch(kernel, stride, padding):
    """The phase-wise ConvTranspose equals ``nn.ConvTranspose2d`` (float64, non-square)."""
    torch_conv = torch.nn.ConvTranspose2d(3, 5, kernel, stride=stride, padding=padding,
                                          dtype=torch.float64)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = torch_conv(x)
    with jax.enable_x64(True):
        conv = layers.ConvTranspose(3, 5, kernel, stride=stride, padding=padding,
                                    rngs=nnx.Rngs(0))
        _load_by_table(conv, torch_conv, [Entry("weight", ("kernel",), CONV_TRANSPOSE),
                                          Entry("bias", ("bias",))])
        actual = conv(ref.to_jax(x, jnp.float64, True))
        assert actual.shape == (2, 4 * stride, 6 * stride, 5)
        assert ref.relative_error(actual, ref.nchw(expected)) <= ref.FLOAT64_TOL


def test_conv_transpose_refuses_other_output_sizes():
    with pytest.raises(ValueError, match="kernel - 2 padding == stride"):
        layers.ConvTranspose(3, 5, 4, stride=2, padding=0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("use_context", [True, False])
def test_full_chain(case, precision, use_context):
    """compressor -> flow -> expander, end to end, with the reparameterisation noise injected."""
    cfg, image_shape, pipe = case
    torch_dtype, jax_dtype, tol = precision
    images, noise, text, t = ref.inputs(cfg, image_shape, torch_dtype, seed=3)
    torch_pipe = ref.cast(pipe, torch_dtype)
    ref.inject_noise(torch_pipe.compressor, noise)
    with torch.no_grad():
        expected = torch_pipe.expander(
            torch_pipe.flow_processor(torch_pipe.compressor(images), text, t),
            use_context=use_context)
    parts = {name: _component(name, cfg, getattr(torch_pipe, name), jax_dtype)
             for name in ("compressor", "flow_processor", "expander")}
    hw = parts["compressor"].latent_shape(*image_shape[1:])

    @nnx.jit
    def chain(compressor, flow, expander, x, eps, e, t):
        velocity = flow(compressor(x, noise=eps), e, t, hw=hw)
        return expander(velocity, use_context=use_context, hw=hw)

    actual = chain(parts["compressor"], parts["flow_processor"], parts["expander"],
                   ref.to_jax(images, jax_dtype, True), ref.to_jax(noise, jax_dtype, True),
                   ref.to_jax(text, jax_dtype), ref.to_jax(t, jax_dtype))
    chain_tol = ref.FLOAT64_TOL if jax_dtype == jnp.float64 else ref.FLOAT32_CHAIN_TOL
    assert ref.relative_error(actual, ref.nchw(expected)) <= chain_tol


@pytest.fixture(scope="module")
def torch_text_encoder():
    return ref.text_encoder(ref.CONFIGS["a"][0], seed=5)


def test_text_encoder(torch_text_encoder, precision):
    cfg = ref.CONFIGS["a"][0]
    torch_dtype, jax_dtype, tol = precision
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, cfg.text_vocab_size, (3, 19), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # padded positions: masked in attention, still in the mean pooling
    mask[2, 5:] = 0
    ids = ids * mask
    torch_model = ref.cast(torch_text_encoder, torch_dtype)
    with torch.no_grad():
        expected = torch_model(ids, attention_mask=mask)
    model = _component("text_encoder", cfg, torch_model, jax_dtype)
    actual = nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids.numpy()),
                                               jnp.asarray(mask.numpy()))
    assert actual.shape == (3, cfg.text_embed_dim)
    assert ref.relative_error(actual, expected) <= tol


DISC_CONFIG = FluxFlowConfig(vae_dim=16, disc_base_channels=8, disc_depth=3)


@pytest.mark.parametrize("training", [False, True])
def test_discriminator(precision, training):
    torch_dtype, jax_dtype, tol = precision
    torch_model = ref.cast(ref.discriminator(DISC_CONFIG, seed=9), torch_dtype)
    model = _component("discriminator", DISC_CONFIG, torch_model, jax_dtype)
    gen = torch.Generator().manual_seed(4)
    images = (torch.rand(2, 3, 40, 56, generator=gen, dtype=torch.float64) * 2 - 1).to(torch_dtype)
    ctx = torch.randn(2, DISC_CONFIG.vae_dim, generator=gen, dtype=torch.float64).to(torch_dtype)
    torch_model.train(training)
    model.train() if training else model.eval()
    before = {k: v.clone() for k, v in torch_model.state_dict().items() if "weight_u" in k}
    with torch.no_grad():
        feats, logits = torch_model(images, ctx)
    actual_feats, actual_logits = model(ref.to_jax(images, jax_dtype, True),
                                        ref.to_jax(ctx, jax_dtype), return_features=True)
    assert actual_logits.shape == (2, 40 // 8, 56 // 8, 1)
    assert ref.relative_error(actual_logits, ref.nchw(logits)) <= tol
    assert ref.relative_error(actual_feats, feats) <= tol
    # In train mode both sides ran one power iteration and stored the new u, v.
    after = ref.state_numpy(torch_model)
    assert any(not torch.equal(before[k], torch.from_numpy(after[k])) for k in before) == training
    assert ref.relative_error(model.head.weight_u[...], after["head.weight_u"]) <= tol
    assert ref.relative_error(model.blocks[2].conv2.conv2.weight_v[...],
                          after["backbone.4.conv2.2.weight_v"]) <= tol


# ------------------------------------------------------------------ building blocks


PRE_ACTIVATIONS = ["sigmoid", "tanh", "silu", "relu", None]


@pytest.mark.parametrize("t_pre", PRE_ACTIVATIONS)
@pytest.mark.parametrize("p_pre", PRE_ACTIVATIONS)
@pytest.mark.parametrize("ndim", [2, 3, 4])
def test_bezier_activation(t_pre, p_pre, ndim):
    with jax.enable_x64(True):
        shape = {2: (4, 15), 3: (2, 3, 15), 4: (2, 15, 3, 4)}[ndim]
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(ndim),
                        dtype=torch.float64)
        expected = TorchBezier(t_pre, p_pre)(x)
        # The reference groups channels along dim 1 for 4-D input and along the last dim
        # otherwise; channel-last JAX always groups the last axis.
        channels_last = ndim == 4
        actual = bezier_activation(ref.to_jax(x, jnp.float64, channels_last), t_pre, p_pre)
        expected = ref.nchw(expected) if channels_last else expected.numpy()
        assert ref.relative_error(actual, expected) <= 1e-12


@pytest.mark.parametrize("torch_shape,channel_only", [((6,), True), ((6,), False),
                                                      ((6, 1, 1), False)])
def test_trainable_bezier(torch_shape, channel_only):
    with jax.enable_x64(True):
        torch_model = ref.perturb(TorchTrainableBezier(torch_shape, channel_only=channel_only),
                                  seed=1).double()
        x = torch.randn(2, 6, 3, 5, dtype=torch.float64) if len(torch_shape) > 1 or channel_only \
            else torch.randn(4, 6, dtype=torch.float64)
        model = TrainableBezier(6, torch_shape=torch_shape)
        for p in ("p0", "p1", "p2", "p3"):
            getattr(model, p).set_value(jnp.asarray(getattr(torch_model, p).detach().reshape(-1)))
        channels_last = x.ndim == 4
        actual = model(ref.to_jax(x, jnp.float64, channels_last))
        expected = torch_model(x)
        expected = ref.nchw(expected) if channels_last else expected.detach().numpy()
        assert ref.relative_error(actual, expected) <= 1e-12


def _load_by_table(module, torch_module, table):
    import_tensors(module, table, ref.state_numpy(torch_module), source="test",
                   dtype=jnp.float64)


@pytest.mark.parametrize("torch_spade", [TorchSPADE, TorchSPADE070], ids=["shared", "v070"])
def test_spade_resizes_context_and_skips_without_it(torch_spade):
    """One SPADE matches both fluxflow's shared one and v070's own copy."""
    with jax.enable_x64(True):
        torch_model = ref.perturb(torch_spade(context_nc=5, num_features=24), seed=2).double()
        model = SPADE(5, 24, rngs=nnx.Rngs(0))
        _load_by_table(model, torch_model, [
            Entry("mlp_shared.0.weight", ("mlp_shared", "kernel"), CONV),
            Entry("mlp_shared.0.bias", ("mlp_shared", "bias")),
            Entry("mlp_beta.weight", ("mlp_beta", "kernel"), CONV),
            Entry("mlp_beta.bias", ("mlp_beta", "bias"))])
        x = torch.randn(2, 24, 6, 10, dtype=torch.float64)
        for context in (torch.randn(2, 5, 3, 4, dtype=torch.float64),  # upsampled
                        torch.randn(2, 5, 9, 13, dtype=torch.float64),  # downsampled
                        None):
            expected = ref.nchw(torch_model(x, context))
            actual = model(ref.to_jax(x, jnp.float64, True),
                           None if context is None else ref.to_jax(context, jnp.float64, True))
            assert ref.relative_error(actual, expected) <= 1e-12


def test_context_attention_mixer_and_gated_injection():
    with jax.enable_x64(True):
        torch_mixer = ref.perturb(TorchMixer(16, n_head=4), seed=3).double()
        mixer = ContextAttentionMixer(16, 4, rngs=nnx.Rngs(0))
        table = [Entry("cls", ("cls",))]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            table += [Entry(f"{proj}.weight", (proj, "kernel"), LINEAR),
                      Entry(f"{proj}.bias", (proj, "bias"))]
        for norm in ("norm_in", "norm_out"):
            table += [Entry(f"{norm}.weight", (norm, "scale")),
                      Entry(f"{norm}.bias", (norm, "bias"))]
        _load_by_table(mixer, torch_mixer, table)
        x = torch.randn(3, 5, 16, dtype=torch.float64)
        pooled, tokens = torch_mixer(x)
        actual_pooled, actual_tokens = mixer(ref.to_jax(x, jnp.float64))
        assert ref.relative_error(actual_pooled, pooled.detach()) <= 1e-12
        assert ref.relative_error(actual_tokens, tokens.detach()) <= 1e-12

        torch_gated = ref.perturb(TorchGated(16, 12), seed=4).double()
        gated = GatedContextInjection(16, 12, rngs=nnx.Rngs(0))
        _load_by_table(gated, torch_gated, [
            Entry("gate.0.weight", ("gate", "kernel"), LINEAR),
            Entry("gate.0.bias", ("gate", "bias")),
            Entry("bias.weight", ("bias", "kernel"), LINEAR),
            Entry("bias.bias", ("bias", "bias"))])
        tokens_in = torch.randn(3, 7, 12, dtype=torch.float64)
        context = torch.randn(3, 16, dtype=torch.float64)
        expected = torch_gated(tokens_in, context).detach()
        actual = gated(ref.to_jax(tokens_in, jnp.float64), ref.to_jax(context, jnp.float64))
        assert ref.relative_error(actual, expected) <= 1e-12
