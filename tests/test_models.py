"""Behaviour of the NNX models on their own (no PyTorch): parameter counts, gradients,
compilation at full size, explicit randomness, shapes, dtypes and config validation.

Speed matters on CPU, where XLA compiles every distinct eager op separately: every forward
runs under one jit, and questions about shapes, dtypes or errors raised while tracing use
``jax.eval_shape``, which compiles nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.models import (BertTextEncoder, Buffer, FluxCompressor, FluxExpander,
                                 FluxFlowConfig, FluxFlowProcessor, PatchDiscriminator,
                                 SpectralState)
from fluxflow_jax.models.bundle import flow_processor
from fluxflow_jax.models.pillar_flow import PillarFilmFlowProcessor
from tiny import TINY

DEFAULT = FluxFlowConfig()
# The "small" reference configuration of the PyTorch project.
SMALL = FluxFlowConfig(vae_dim=32, flow_dim=32, text_embed_dim=32, flow_attn_heads=8,
                       flow_transformer_layers=2, vae_attn_layers=2)
PIPELINE = (FluxCompressor, flow_processor, FluxExpander)  # the flow of the config's version

BATCH, HEIGHT, WIDTH = 2, 32, 48
GRID = (8, 12)  # TINY's latent grid for 32x48 images: two stride-2 stages
TEXT_LENGTH = 7
# XLA's lowest optimisation level roughly halves the CPU compile time of a gradient program
# (these tests check behaviour, not speed), but it makes large convolutions run ~10x slower.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# --------------------------------------------------------------------------- helpers

# Compressor forwards shared by several tests, so that each compiles once.
sample_packed = nnx.jit(lambda model, images, key: model(images, key=key))
encode_with_noise = nnx.jit(lambda model, images, noise: model.encode(images, noise=noise))


def build(cls, config: FluxFlowConfig = TINY, seed: int = 0) -> nnx.Module:
    """``cls(config)`` with every Param perturbed, so that zero biases and constant Bezier
    control points cannot hide a dead path."""
    model = cls(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda p: p + rng.normal(0.0, 0.1, p.shape).astype(p.dtype), params))
    return model


def images_batch() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (BATCH, HEIGHT, WIDTH, 3)).astype(np.float32)


def text_batch() -> tuple[np.ndarray, np.ndarray]:
    """Token ids and an attention mask whose second row is padded."""
    ids = np.random.default_rng(1).integers(0, TINY.text_vocab_size, (BATCH, TEXT_LENGTH))
    ids = ids.astype(np.int32)
    mask = np.ones((BATCH, TEXT_LENGTH), bool)
    mask[1, 4:] = False
    return ids, mask


def flow_conditioning() -> tuple[np.ndarray, np.ndarray]:
    """(pooled text embeddings [B, text_embed_dim], timesteps [B] in [0, 1])."""
    text = np.random.default_rng(2).normal(size=(BATCH, TINY.text_embed_dim)).astype(np.float32)
    return text, np.array([0.1, 0.7], np.float32)


def expected_hw_token(h: int, w: int, dim: int, max_hw: int) -> np.ndarray:
    token = np.zeros(dim, np.float32)
    token[:2] = h / max_hw, w / max_hw
    return token


def probe_loss(out: jax.Array) -> jax.Array:
    """A fixed random projection of the output: unlike a plain sum or sum of squares it
    cannot be constant after a normalisation layer."""
    probe = np.random.default_rng(3).standard_normal(out.shape).astype(np.float32)
    return jnp.vdot(out, probe)


def output_and_grads(model: nnx.Module, forward, *args, optimize: bool = False):
    """``forward(model, *args)`` and the gradient of ``probe_loss`` w.r.t. its Params.

    One jit over nnx.split/merge, compiled with FAST_COMPILE unless ``optimize``. State the
    call changes (spectral-norm vectors) is written back to ``model``, as an NNX transform
    would.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, *args):
        # copy: Variables created at this trace level, so the forward may update them
        module = nnx.merge(graphdef, params, rest, copy=True)
        out = forward(module, *args)
        return probe_loss(out), (out, nnx.split(module, nnx.Param, ...)[2])

    options = None if optimize else FAST_COMPILE
    grad_fn = jax.jit(jax.grad(loss, has_aux=True), compiler_options=options)
    grads, (out, new_rest) = grad_fn(params, rest, *args)
    nnx.update(model, new_rest)
    return out, grads


def leaves_by_path(state) -> dict[str, np.ndarray]:
    """State leaves keyed by dotted path, e.g. 'upscale.0.spade.mlp_beta.kernel'."""
    def dotted(path) -> str:
        parts = (getattr(key, "key", getattr(key, "idx", None)) for key in path)
        return ".".join(str(part) for part in parts if part is not None)

    return {dotted(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def assert_gradients_flow(grads, unused: tuple[str, ...] = ()) -> None:
    """Every gradient is finite, and exactly the Params whose path contains one of the
    ``unused`` fragments get an all-zero gradient."""
    leaves = leaves_by_path(grads)
    assert leaves
    for path, grad in leaves.items():
        assert np.isfinite(grad).all(), path
    zero = {path for path, grad in leaves.items() if not grad.any()}
    expected_zero = {path for path in leaves if any(name in path for name in unused)}
    assert zero == expected_zero
    for name in unused:
        assert any(name in path for path in expected_zero), f"no Param named {name}"


def set_mode(model: nnx.Module, train: bool) -> None:
    """NNX train/eval mode: dropout and spectral-norm power iteration on or off."""
    if train:
        model.train()
    else:
        model.eval()


def spectral_vectors(model: nnx.Module) -> dict[str, np.ndarray]:
    return leaves_by_path(nnx.state(model, SpectralState))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compressor():
    return build(FluxCompressor)


@pytest.fixture(scope="module")
def compressor_run(compressor):
    """(packed latents of ``images_batch()`` sampled with key 0, gradients)."""
    return output_and_grads(compressor, lambda m, x, key: m(x, key=key), images_batch(),
                            jax.random.key(0))


@pytest.fixture(scope="module")
def packed(compressor_run):
    return np.asarray(compressor_run[0])


@pytest.fixture(scope="module")
def flow():
    return build(FluxFlowProcessor)


@pytest.fixture(scope="module")
def flow_run(flow, packed):
    return output_and_grads(flow, lambda m, p, txt, t: m(p, txt, t, hw=GRID), packed,
                            *flow_conditioning())


@pytest.fixture(scope="module")
def expander():
    return build(FluxExpander)


@pytest.fixture(scope="module")
def expander_runs(expander, packed):
    """use_context -> (images, gradients); optimised: 16x16 transposed convolutions."""
    def run(use_context: bool):
        return output_and_grads(expander, lambda m, p: m(p, use_context, hw=GRID), packed,
                                optimize=True)

    return {use_context: run(use_context) for use_context in (True, False)}


@pytest.fixture(scope="module")
def text_run():
    """(eval-mode embeddings, gradients)."""
    encoder = build(BertTextEncoder)
    set_mode(encoder, train=False)
    return output_and_grads(encoder, lambda m, ids, mask: m(ids, mask), *text_batch())


# --------------------------------------------------------------------------- 1. parameter counts


@functools.cache
def abstract_model(cls, config: FluxFlowConfig) -> nnx.Module:
    """The model with ShapeDtypeStructs for arrays; cached because tracing the default
    flow processor's construction alone takes seconds."""
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def param_count(cls, config: FluxFlowConfig) -> int:
    """Number of trainable scalars (nnx.Param only)."""
    params = nnx.state(abstract_model(cls, config), nnx.Param)
    return sum(leaf.size for leaf in jax.tree.leaves(params))


V030 = DEFAULT.replace(model_version="0.3.0")
V070 = DEFAULT.replace(model_version="0.7.0")
V080 = DEFAULT.replace(model_version="0.8.0")


# PyTorch fluxflow 0.8.1's counts at these widths (sum of numel over its module parameters).
@pytest.mark.parametrize("cls, config, expected", [
    (FluxCompressor, DEFAULT, 12_580_809),
    (FluxFlowProcessor, DEFAULT, 5_373_824),
    (FluxExpander, DEFAULT, 93_416_527),
    (FluxCompressor, V030, 12_580_553),
    (FluxFlowProcessor, V030, 5_373_824),
    (FluxExpander, V030, 93_483_215),
    (FluxCompressor, V070, 12_581_454),
    (FluxFlowProcessor, V070, 5_375_109),
    (FluxExpander, V070, 92_849_743),
    (PillarFilmFlowProcessor, V080, 7_490_309),
    (BertTextEncoder, DEFAULT, 70_973_440),
    (PatchDiscriminator, DEFAULT.replace(disc_ctx_dim=1024), 46_022_977),
    (PatchDiscriminator, DEFAULT.replace(disc_ctx_dim=0), 43_923_777),
], ids=["compressor_v060", "flow_v060", "expander_v060", "compressor_v030", "flow_v030",
        "expander_v030", "compressor_v070", "flow_v070", "expander_v070", "flow_v080",
        "text_encoder", "disc_ctx1024", "disc_unconditioned"])
def test_parameter_count_matches_pytorch(cls, config, expected):
    assert param_count(cls, config) == expected


@pytest.mark.parametrize("config, expected", [
    (DEFAULT, 111_371_160), (V030, 111_437_592), (V070, 110_806_306), (V080, 112_921_506),
    (SMALL, 7_110_080), (SMALL.replace(model_version="0.3.0"), 7_114_400),
    (SMALL.replace(model_version="0.8.0"), 7_012_682)],
    ids=["default_v060", "default_v030", "default_v070", "default_v080", "small_v060",
         "small_v030", "small_v080"])
def test_pipeline_parameter_total(config, expected):
    assert sum(param_count(cls, config) for cls in PIPELINE) == expected


def test_discriminator_context_width_defaults_to_the_latent_token_width():
    assert DEFAULT.discriminator_ctx_dim == DEFAULT.vae_dim
    assert V070.discriminator_ctx_dim == V070.vae_dim + 5
    assert (param_count(PatchDiscriminator, DEFAULT)
            == param_count(PatchDiscriminator, DEFAULT.replace(disc_ctx_dim=DEFAULT.vae_dim)))


# --------------------------------------------------------------------------- 2. gradients


def test_compressor_gradients(compressor_run):
    assert_gradients_flow(compressor_run[1])


def test_flow_gradients(flow_run):
    """Cross-attention attends to a single text token, so its softmax is 1 whatever the
    query: the query projection is dead, in the PyTorch reference as well."""
    assert_gradients_flow(flow_run[1], unused=("cross_attn.q_proj",))


@pytest.mark.parametrize("use_context", [True, False], ids=["context", "no_context"])
def test_expander_gradients(expander_runs, use_context):
    """Without context SPADE's convolutions are skipped entirely."""
    _, grads = expander_runs[use_context]
    assert_gradients_flow(grads, () if use_context else ("spade.mlp_",))


def test_text_encoder_gradients(text_run):
    assert_gradients_flow(text_run[1])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_discriminator_gradients_and_power_iteration(train):
    """Train mode runs one power-iteration step and stores u, v; eval mode leaves them.

    (The head's u has one entry: a unit vector of length 1 is +-1 and may not move.)
    """
    disc = build(PatchDiscriminator)
    set_mode(disc, train)
    before = spectral_vectors(disc)
    context = np.random.default_rng(4).normal(size=(BATCH, TINY.discriminator_ctx_dim))
    context = context.astype(np.float32)
    _, grads = output_and_grads(disc, lambda m, x, c: m(x, c), images_batch(), context)
    assert_gradients_flow(grads)
    after = spectral_vectors(disc)
    assert before.keys() == after.keys() and before
    for path in before:
        if before[path].size > 1:
            assert np.array_equal(before[path], after[path]) != train, path
        if not train:
            np.testing.assert_array_equal(before[path], after[path])


def test_discriminator_explicit_power_iteration_equals_a_train_mode_call():
    """``power_iteration()`` then an eval-mode call is exactly one train-mode call: what the
    functional train step relies on."""
    images = images_batch()
    context = np.ones((BATCH, TINY.discriminator_ctx_dim), np.float32)
    implicit = build(PatchDiscriminator)
    explicit = build(PatchDiscriminator)
    implicit.train()
    explicit.eval()
    explicit.power_iteration()
    np.testing.assert_array_equal(np.asarray(explicit(images, context)),
                                  np.asarray(implicit(images, context)))
    for path, vector in spectral_vectors(implicit).items():
        np.testing.assert_array_equal(spectral_vectors(explicit)[path], vector, err_msg=path)


def test_rotary_frequencies_are_a_buffer_not_a_param(flow):
    inv_freq = flow.transformer_blocks[0].inv_freq
    assert isinstance(inv_freq, Buffer) and not isinstance(inv_freq, nnx.Param)
    assert not any("inv_freq" in path for path in leaves_by_path(nnx.state(flow, nnx.Param)))
    assert any("inv_freq" in path for path in leaves_by_path(nnx.state(flow, Buffer)))


# --------------------------------------------------------------------------- 3. full-size compile


def default_forwards():
    """(class, forward(model, *inputs), abstract inputs, output shape) at 64x64 images."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    dim, tokens = DEFAULT.vae_dim, 4 * 4 + 1
    return {
        "compressor": (FluxCompressor, lambda m, x, key: m(x, key=key),
                       (f32(1, 64, 64, 3), jax.eval_shape(jax.random.key, 0)),
                       (1, tokens, dim)),
        "flow": (FluxFlowProcessor, lambda m, p, txt, t: m(p, txt, t, hw=(4, 4)),
                 (f32(1, tokens, dim), f32(1, DEFAULT.text_embed_dim), f32(1)),
                 (1, tokens, dim)),
        "expander": (FluxExpander, lambda m, p: m(p, hw=(4, 4)), (f32(1, tokens, dim),),
                     (1, 64, 64, 3)),
        "text_encoder": (BertTextEncoder, lambda m, ids: m(ids),
                         (jax.ShapeDtypeStruct((1, 16), jnp.int32),),
                         (1, DEFAULT.text_embed_dim)),
        "discriminator": (PatchDiscriminator, lambda m, x, c: m(x, c),
                          (f32(1, 64, 64, 3), f32(1, DEFAULT.vae_dim)), (1, 4, 4, 1)),
    }


@pytest.mark.parametrize("name", ["compressor", "flow", "expander", "text_encoder",
                                  "discriminator"])
def test_default_size_models_compile(name):
    """Lowered and compiled from abstract weights and inputs: nothing big is allocated."""
    cls, forward, inputs, out_shape = default_forwards()[name]
    model = abstract_model(cls, DEFAULT)
    model.eval()  # dropout off; spectral norm without the power-iteration update
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda state, *args: forward(nnx.merge(graphdef, state), *args)).lower(
        state, *inputs).compile()
    assert compiled.out_info.shape == out_shape
    assert compiled.out_info.dtype == jnp.float32


# --------------------------------------------------------------------------- 4. randomness


@pytest.mark.parametrize("kwargs", [
    {},
    {"noise": np.zeros((BATCH, *GRID, TINY.vae_dim), np.float32), "key": jax.random.key(0)},
    {"noise": np.zeros((BATCH, *GRID, TINY.vae_dim + 1), np.float32)},
    {"noise": np.zeros((BATCH, *GRID), np.float32)},
], ids=["neither", "both", "wrong_width", "wrong_rank"])
def test_compressor_rejects_bad_noise_arguments(compressor, kwargs):
    with pytest.raises(ValueError, match="noise"):
        jax.eval_shape(lambda x: compressor(x, **kwargs), images_batch())


def test_compressor_key_determines_sample(compressor):
    images = images_batch()
    first, again, other = (np.asarray(sample_packed(compressor, images, jax.random.key(k)))
                           for k in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first[:, :-1], other[:, :-1])
    np.testing.assert_array_equal(first[:, -1], other[:, -1])  # the hw token


def test_compressor_key_draws_standard_normal_noise(compressor):
    """key= is the same as noise=jax.random.normal(key, latent shape)."""
    images, key = images_batch(), jax.random.key(5)
    from_key = sample_packed(compressor, images, key)
    noise = jax.random.normal(key, (BATCH, *GRID, TINY.vae_dim))
    from_noise = encode_with_noise(compressor, images, noise).packed
    np.testing.assert_allclose(from_key, from_noise, rtol=1e-5, atol=1e-6)


def test_zero_noise_samples_the_mean(compressor):
    """With noise 0, z = mu: changing the log-variance head changes nothing downstream,
    while with random noise it does."""
    shifted = nnx.clone(compressor)
    shifted.logvar_activation.p3[...] = shifted.logvar_activation.p3[...] + 1.0
    encode, images = encode_with_noise, images_batch()
    zeros = np.zeros((BATCH, *GRID, TINY.vae_dim), np.float32)
    noise = np.random.default_rng(6).normal(size=zeros.shape).astype(np.float32)

    base, again = encode(compressor, images, zeros), encode(compressor, images, zeros)
    np.testing.assert_array_equal(base.packed, again.packed)
    assert base.mu.shape == base.logvar.shape == zeros.shape
    assert not np.allclose(encode(compressor, images, noise).packed, base.packed)

    moved = encode(shifted, images, zeros)
    assert not np.allclose(moved.logvar, base.logvar)
    np.testing.assert_array_equal(moved.packed, base.packed)
    assert not np.allclose(encode(shifted, images, noise).packed,
                           encode(compressor, images, noise).packed)


def test_text_encoder_train_mode_needs_rngs():
    encoder = build(BertTextEncoder)
    set_mode(encoder, train=True)
    with pytest.raises(ValueError, match="rngs"):
        jax.eval_shape(lambda ids, mask: encoder(ids, mask), *text_batch())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_text_encoder_dropout_randomness(train):
    """Train mode: the output is a function of the dropout key. Eval mode: keys are ignored."""
    encoder = build(BertTextEncoder)
    set_mode(encoder, train)
    embed = nnx.jit(lambda m, ids, mask, key: m(ids, mask, rngs=nnx.Rngs(dropout=key)))
    first, again, other = (np.asarray(embed(encoder, *text_batch(), jax.random.key(k)))
                           for k in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert np.array_equal(first, other) != train


# --------------------------------------------------------------------------- 5. shapes, hw token


def test_packed_layout_and_hw_token(packed):
    h, w = GRID
    assert packed.shape == (BATCH, h * w + 1, TINY.vae_dim)
    token = expected_hw_token(h, w, TINY.vae_dim, TINY.max_hw)
    np.testing.assert_array_equal(packed[:, -1], np.broadcast_to(token, packed[:, -1].shape))


@pytest.mark.parametrize("height, width", [(32, 48), (40, 24), (64, 64), (33, 47), (17, 30)])
def test_latent_shape_matches_the_encoder(compressor, height, width):
    images = jax.ShapeDtypeStruct((BATCH, height, width, 3), jnp.float32)
    encoded = jax.eval_shape(lambda x: compressor.encode(x, key=jax.random.key(0)), images)
    h, w = compressor.latent_shape(height, width)
    assert encoded.mu.shape == (BATCH, h, w, TINY.vae_dim)
    assert encoded.packed.shape == (BATCH, h * w + 1, TINY.vae_dim)


def test_expander_output_shape(expander_runs):
    scale = 2**TINY.upscales
    for images, _ in expander_runs.values():
        assert images.shape == (BATCH, GRID[0] * scale, GRID[1] * scale, TINY.in_channels)


def test_expander_non_square_grid_shape(expander):
    packed = jax.ShapeDtypeStruct((1, 3 * 5 + 1, TINY.vae_dim), jnp.float32)
    assert jax.eval_shape(lambda p: expander(p, hw=(3, 5)), packed).shape == (1, 12, 20, 3)


def test_flow_keeps_the_hw_token(flow_run, packed):
    out, _ = flow_run
    assert out.shape == packed.shape
    np.testing.assert_array_equal(np.asarray(out)[:, -1], packed[:, -1])


def grid_readers(flow, expander):
    """Forwards that read the latent grid from the hw token (no hw= given)."""
    text, timesteps = flow_conditioning()
    return {"flow": (flow, lambda m, p: m(p, text, timesteps)),
            "expander": (expander, lambda m, p: m(p))}


@pytest.mark.parametrize("hw", [(8.0, 12), (8,), "8x12", (0, 12)])
def test_hw_must_be_positive_python_ints(expander, packed, hw):
    with pytest.raises(ValueError, match="hw must be two positive Python ints"):
        expander(packed, hw=hw)


def test_flow_refuses_integer_timesteps(flow, packed):
    """An integer t would index the time embedding at t * 999: the 0.2.x bug."""
    text, _ = flow_conditioning()
    with pytest.raises(TypeError, match="timesteps must be floats"):
        jax.eval_shape(lambda p: flow(p, text, jnp.array([3, 500]), hw=GRID), packed)


@pytest.mark.parametrize("name", ["flow", "expander"])
def test_grid_under_jit_needs_hw(flow, expander, packed, name):
    model, forward = grid_readers(flow, expander)[name]
    with pytest.raises(ValueError, match="hw="):
        nnx.jit(forward)(model, packed)


@pytest.mark.parametrize("name", ["flow", "expander"])
def test_mixed_grids_in_a_batch_are_rejected(flow, expander, packed, name):
    model, forward = grid_readers(flow, expander)[name]
    mixed = packed.copy()
    mixed[1, -1, :2] = expected_hw_token(GRID[1], GRID[0], 2, TINY.max_hw)  # transposed
    with pytest.raises(ValueError, match="bucketing"):
        forward(model, mixed)  # numpy input: the check runs before any computation


# --------------------------------------------------------------------------- 6. dtype


@pytest.fixture(scope="module")
def abstract_forwards(compressor, flow, expander):
    """name -> (model, forward, abstract float32 inputs) for every component (train-mode
    discriminator, eval-mode text encoder)."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    tokens = (BATCH, GRID[0] * GRID[1] + 1, TINY.vae_dim)
    text_ids = jax.ShapeDtypeStruct((BATCH, TEXT_LENGTH), jnp.int32)
    encoder, disc = build(BertTextEncoder), build(PatchDiscriminator)
    set_mode(encoder, train=False)
    return {
        "compressor": (compressor, lambda m, x, n: m(x, noise=n),
                       (f32(BATCH, HEIGHT, WIDTH, 3), f32(BATCH, *GRID, TINY.vae_dim))),
        "flow": (flow, lambda m, p, txt, t: m(p, txt, t, hw=GRID),
                 (f32(*tokens), f32(BATCH, TINY.text_embed_dim), f32(BATCH))),
        "expander": (expander, lambda m, p: m(p, hw=GRID), (f32(*tokens),)),
        "text_encoder": (encoder, lambda m, ids: m(ids), (text_ids,)),
        "discriminator": (disc, lambda m, x, c: m(x, c),
                          (f32(BATCH, HEIGHT, WIDTH, 3), f32(BATCH, TINY.discriminator_ctx_dim))),
    }


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_float32_in_float32_out(abstract_forwards, x64):
    """Checked with eval_shape: output dtypes are fixed at trace time."""
    with jax.enable_x64(x64):
        for name, (model, forward, inputs) in abstract_forwards.items():
            out = nnx.eval_shape(forward, model, *inputs)
            assert out.dtype == jnp.float32, name


def test_computed_outputs_are_float32(compressor_run, flow_run, expander_runs, text_run):
    for out, _ in (compressor_run, flow_run, *expander_runs.values(), text_run):
        assert out.dtype == jnp.float32


@pytest.mark.parametrize("cls", [FluxCompressor, FluxFlowProcessor, FluxExpander,
                                 BertTextEncoder, PatchDiscriminator])
def test_params_are_float32_under_x64(cls):
    with jax.enable_x64(True):
        model = nnx.eval_shape(lambda: cls(TINY, rngs=nnx.Rngs(0)))
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}


# --------------------------------------------------------------------------- 7. config


@pytest.mark.parametrize("changes, field", [
    ({"vae_dim": 20}, "vae_attn_heads"),
    ({"vae_dim": 325, "vae_attn_heads": 5}, "even"),  # 325 passes every other check
    ({"flow_dim": 24, "flow_attn_heads": 8}, "flow head width"),
    ({"flow_dim": 20, "flow_attn_heads": 8}, "flow_attn_heads"),
    ({"text_dim": 100}, "text_heads"),
    ({"vae_dim": 0}, "vae_dim"),
    ({"downscales": 0}, "downscales"),
    ({"flow_attn_heads": -1}, "flow_attn_heads"),
    ({"text_layers": 0}, "text_layers"),
    ({"max_hw": 0}, "max_hw"),
    ({"flow_transformer_layers": 0}, "flow_transformer_layers"),
    ({"time_steps": 0}, "time_steps"),
    ({"disc_depth": -1}, "disc_depth"),
    ({"vae_attn_layers": -1}, "vae_attn_layers"),
    ({"text_dropout": 1.5}, "text_dropout"),
    ({"disc_ctx_dim": -5}, "disc_ctx_dim"),
])
def test_config_rejects_inconsistent_fields(changes, field):
    with pytest.raises(ValueError, match=field):
        FluxFlowConfig(**changes)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as raised:
        FluxFlowConfig(vae_dim=20, text_dim=100)
    assert "vae_attn_heads" in str(raised.value) and "text_heads" in str(raised.value)


@pytest.mark.parametrize("vae_dim, channels", [(128, [5, 36, 66, 97, 128]),
                                               (32, [5, 12, 18, 25, 32])])
def test_compressor_channels_round_like_torch(vae_dim, channels):
    assert FluxFlowConfig(vae_dim=vae_dim).compressor_channels == channels


@pytest.mark.parametrize("length", [1, 32, 33, 75, 256, 301])
def test_folded_last_axis_reductions_equal_numpys(length):
    """Folding in halves (odd lengths carry their last entry) gives numpy's max exactly and
    its sum to rounding, for lengths below, at and above the fold width."""
    from fluxflow_jax.models.layers import reduce_last_axis

    x = np.random.default_rng(length).standard_normal((3, 5, length)).astype(np.float32)
    x[1, 2, length // 3] = 9.0  # a max away from the ends
    np.testing.assert_array_equal(reduce_last_axis(jnp.asarray(x), jnp.maximum, jnp.max),
                                  x.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(reduce_last_axis(jnp.asarray(x), jnp.add, jnp.sum),
                               x.astype(np.float64).sum(axis=-1, keepdims=True), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("keys", [1, 37, 300])
def test_attention_is_softmax_attention_value_and_gradient(keys):
    """The late-normalised float64 attention equals softmax(q k^T / sqrt(dh)) v written out,
    in value and gradient, with logits large enough to overflow an unshifted exp."""
    from fluxflow_jax.models.layers import attention

    def written_out(q, k, v):
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(8.0)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((2, 29, 3, 8)) * 30.0)
        k, v = (jnp.asarray(rng.standard_normal((2, keys, 3, 8)) * 30.0) for _ in range(2))

        def probe(form):
            return jax.grad(lambda *qkv: jnp.sum(jnp.sin(form(*qkv))), (0, 1, 2))(q, k, v)

        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(8.0)
        assert q.dtype == jnp.float64 and float(jnp.abs(logits).max()) > 800  # exp overflows
        np.testing.assert_allclose(attention(q, k, v), written_out(q, k, v), rtol=1e-10,
                                   atol=1e-10)
        for ours, reference in zip(probe(attention), probe(written_out), strict=True):
            np.testing.assert_allclose(ours, reference, rtol=1e-8, atol=1e-8)
