"""What keeps the demo's flow from drawing the caption's shape: the flow, or the caption
vector it gets? One controlled training loop, with either part swapped.

    python tools/flow_conditioning_probe.py CHECKPOINT --flow {fluxflow,dit}
        --caption {oracle,text_encoder,pretrained_text_encoder} [--flow-version V]
        [--config configs/demo.yaml] [--trained N] [--updates 20480] [--text-lr 2e-4]
        [--freeze-language-model] [--no-text-dropout] [--rotate-oracle]
        [--pretrain-objective {ngrams,latents,contrastive,oracle}] [--pretrain-updates 8192]
        [--contrastive-batch 64]
        [--normalise {none,scale,standardise,whiten}] [--seed 0] [--flow-lr 2e-3]
        [--film-start {random,zero}] [--score-at N [N ...]]
        [--held-out 256]

CHECKPOINT holds a trained autoencoder and a text encoder, e.g. what ``fluxflow-jax export
RUN OUT --step vae`` writes after the demo's autoencoder step (its text encoder is still
as initialised, as at the start of the demo's flow step). The compressor encodes the
config's demo images (``--trained``, by default its ``demo_samples``) once (mean latents);
a freshly initialised flow then trains on them for ``--updates`` batches of 4: the
checkpoint's kind of flow noise (``model.flow_noise``; encoded noise images for the demo),
uniform timesteps, v-prediction, MSE, AdamW at ``--flow-lr`` (2e-3), one caption in ten
dropped (zero vector) as for guidance. Then it generates from the held-out captions
(DPM-Solver++, 20 steps, no guidance), the expander decodes, and the demo scorer reads
background, shape colour and position, as ``evaluate`` does; the same for as many trained
captions, to tell a flow that memorised its captions from one that learnt nothing
(``--score-at``: also after those updates, to follow when shapes appear). Last, a linear
probe of the caption vectors the flow got (``tools/text_embedding_probe.py``'s ridge
regression, fitted on the trained captions, scored on the held-out ones) says what they
hold.

- ``--flow fluxflow``: the checkpoint's own flow architecture (PyTorch fluxflow's
  ``FluxFlowProcessor`` for v060), freshly initialised; ``--flow-version 0.8.0`` builds
  that version's flow instead (v080's FiLM-modulated pillars), its wider tokens the
  checkpoint's padded with zeros: a diagnostic, as PyTorch pairs each flow with its own
  version's autoencoder. ``--film-start zero`` starts its FiLM projections at zero, so each
  pillar starts unmodulated and learns how the caption scales and shifts it (as DiT's
  adaLN-Zero does); ``random`` keeps PyTorch's initialisation.
- ``--flow dit``: a control that is not a fluxflow architecture: two pre-norm transformer
  blocks of width 64 with a learned absolute position table and adaLN-Zero conditioning
  (DiT's): every block scales and shifts its normalised tokens by the caption and time.
- ``--caption oracle``: a fixed vector that spells the caption out (one-hot shape colour,
  one-hot position, the two background halves' RGB, one-hot shape), zero-padded to the
  text embedding's width; nothing about it has to be learnt. ``--rotate-oracle`` turns
  it by a fixed random rotation: the same content, spread over every component.
- ``--caption text_encoder``: the checkpoint's text encoder, trained along with the flow
  (AdamW at ``--text-lr``, betas (0.9, 0.99), weight decay 0.01, dropout on), as the
  pipeline's flow step trains it; ``--freeze-language-model`` trains its head only.
- ``--caption pretrained_text_encoder``: the text encoder is first trained alone for
  ``--pretrain-updates`` batches (same optimizer) through a head that is discarded
  afterwards, then frozen while the flow trains. Its objective (``--pretrain-objective``):
  - ``ngrams``: a linear read-out names the caption's words and word pairs (hashed into
    ``NGRAM_BUCKETS``, sigmoid cross-entropy), batches of 4;
  - ``latents``: a linear read-out predicts the image's latent tokens (MSE), batches of 4;
  - ``contrastive``: CLIP's objective: in a batch of ``--contrastive-batch`` captions,
    each must pick out its own image's latent tokens (``LatentTower``,
    ``contrastive_loss``);
  - ``oracle``, a check of what the encoder can carry: a linear read-out predicts the
    oracle vector (MSE), batches of 4.
- ``--normalise``, for a fixed caption vector (the oracle or a pretrained encoder's):
  centre the vectors over the trained captions and either scale them to an average
  variance of 1 (``scale``), scale each component to variance 1 (``standardise``) or
  whiten them (``whiten``: identity covariance) before the flow gets them.

docs/learning.md (sections 2.4 to 2.7) records the numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

BATCH, FLOW_LR, SOLVER_STEPS, KEEP_CAPTION = 4, 2e-3, 20, 0.9
ORACLE_WIDTH = 32  # 12 shape colours, 9 positions, 2 x 3 background RGB, 5 shapes
NGRAM_BUCKETS = 1024
CAPTIONS = ("oracle", "text_encoder", "pretrained_text_encoder")
PRETRAIN_OBJECTIVES = ("ngrams", "latents", "contrastive", "oracle")
CONTRASTIVE_BATCH = 64
NORMALISATIONS = ("none", "scale", "standardise", "whiten")
FILM_STARTS = ("random", "zero")


def oracle_vector(scene, width: int) -> np.ndarray:
    """The caption's attributes spelt out as a fixed vector of ``width`` (>= 32)."""
    from fluxflow_jax.data.demo import COLOURS, POSITIONS, SHAPES

    colours = list(COLOURS)
    rgb = lambda name: np.asarray(COLOURS[name], np.float32) / 127.5 - 1  # noqa: E731
    parts = [np.eye(len(colours))[colours.index(scene.colour)],
             np.eye(len(POSITIONS))[list(POSITIONS).index(scene.position)],
             rgb(scene.background[0]), rgb(scene.background[-1]),
             np.eye(len(SHAPES))[SHAPES.index(scene.shape)]]
    vector = np.concatenate(parts).astype(np.float32)
    return np.pad(vector, (0, width - len(vector)))


def rotation(width: int, seed: int = 0) -> np.ndarray:
    """A fixed random orthogonal matrix [width, width]."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(width, width)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def normalisation(embeddings: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, matrix) for ``(x - mean) @ matrix`` over ``embeddings`` [N, D]: ``none``
    leaves them as they are; ``scale`` centres them and scales them to an average variance
    of 1, keeping their directions' proportions; ``standardise`` centres them and scales
    each component to variance 1 (a per-channel affine map, which the text encoder's last
    layer could absorb); ``whiten`` centres them and gives them identity covariance
    (both floor tiny variances: ``_inverse_std``)."""
    width = embeddings.shape[1]
    if kind == "none":
        return np.zeros(width, np.float32), np.eye(width, dtype=np.float32)
    mean = embeddings.mean(axis=0)
    covariance = np.cov(embeddings - mean, rowvar=False)
    if kind == "scale":
        return mean, np.eye(width, dtype=np.float32) / np.sqrt(np.trace(covariance) / width)
    if kind == "standardise":
        return mean, np.diag(_inverse_std(np.diag(covariance))).astype(np.float32)
    variances, directions = np.linalg.eigh(covariance)
    return mean, (directions * _inverse_std(variances)).astype(np.float32)


def _inverse_std(variances: np.ndarray) -> np.ndarray:
    """1 / sqrt(variance), the variances floored at 1e-4 of the largest."""
    return 1 / np.sqrt(np.maximum(variances, 1e-4 * variances.max()))


def ngram_targets(ids: jax.Array, mask: jax.Array, buckets: int = NGRAM_BUCKETS) -> jax.Array:
    """Which words and neighbouring word pairs each caption holds, hashed into ``buckets``:
    [B, buckets] of 0/1 from token ids and their mask [B, L]."""
    ids = ids.astype(jnp.uint32)
    pairs = (ids[:, :-1] * jnp.uint32(65599) + ids[:, 1:]) % buckets
    hashed = jnp.concatenate([jnp.where(mask, ids % buckets, buckets),
                              jnp.where(mask[:, :-1] & mask[:, 1:], pairs, buckets)], axis=1)
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros((ids.shape[0], buckets + 1)).at[rows, hashed].set(1.0)[:, :buckets]


def text_adamw(lr: float, weight_decay: float = 0.01) -> optax.GradientTransformation:
    """The optimizer the pipeline's flow step gives the text encoder by default."""
    return optax.adamw(lr, b2=0.99, weight_decay=weight_decay)


class LatentTower(nnx.Module):
    """The image side of the contrastive objective: an image's latent tokens, flattened
    and standardised, through a two-layer MLP to the text embedding's width, and a learnt
    logit scale."""

    def __init__(self, inputs: int, width: int, hidden: int = 256, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(inputs, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, width, rngs=rngs)
        self.log_scale = nnx.Param(jnp.log(jnp.asarray(1 / 0.07)))

    def __call__(self, latents: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.hidden(latents)))


def contrastive_loss(text: jax.Array, image: jax.Array, log_scale: jax.Array) -> jax.Array:
    """CLIP's symmetric cross-entropy: each caption must pick out its own image among the
    batch's, and each image its caption, by the cosine similarity of their embeddings."""
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    logits = jnp.exp(log_scale) * text @ image.T
    labels = jnp.arange(len(text))
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def pretrain_text_encoder(encoder: nnx.Module, ids: jax.Array, mask: jax.Array,
                          objective: str, targets: jax.Array | None, trained: int,
                          updates: int, lr: float, dropout: bool,
                          contrastive_batch: int = CONTRASTIVE_BATCH, seed: int = 0) -> None:
    """Train ``encoder`` alone on the first ``trained`` captions for ``objective`` (one of
    ``PRETRAIN_OBJECTIVES``) through a head that is then dropped, and leave it in eval mode.

    ``ngrams``: a linear read-out names the caption's n-grams (``ngram_targets``);
    ``targets`` is unused. ``latents`` and ``oracle``: a linear read-out predicts the
    caption's row of ``targets`` (MSE). ``contrastive``: a ``LatentTower`` embeds the
    caption's row of ``targets`` (its image's latent tokens, each feature standardised over
    the trained images so that none is too faint to tell images apart by), and each of a
    batch of ``contrastive_batch`` distinct captions must pick out its own image
    (``contrastive_loss``). ``seed`` draws other initial head weights and batches.
    """
    width = encoder.config.text_embed_dim
    rngs = nnx.Rngs(5 + seed)
    if objective == "contrastive":
        batch = min(contrastive_batch, trained)
        features = targets.reshape(len(targets), -1)
        mean, std = features[:trained].mean(axis=0), features[:trained].std(axis=0)
        targets = (features - mean) / (std + 1e-6)
        head = LatentTower(targets.shape[1], width, rngs=rngs)
    else:
        batch = BATCH
        head = nnx.Linear(width, NGRAM_BUCKETS if objective == "ngrams" else targets[0].size,
                          rngs=rngs)
    text_optimizer = nnx.Optimizer(encoder, text_adamw(lr), wrt=nnx.Param)
    head_optimizer = nnx.Optimizer(head, optax.adamw(FLOW_LR, weight_decay=0.0), wrt=nnx.Param)
    if dropout:
        encoder.train()

    def head_loss(head, embeddings, rows):
        if objective == "contrastive":
            return contrastive_loss(embeddings, head(targets[rows]), head.log_scale[...])
        guess = head(embeddings)
        if objective == "ngrams":
            words = ngram_targets(ids[rows], mask[rows])
            return optax.sigmoid_binary_cross_entropy(guess, words).sum(-1).mean()
        return jnp.mean((guess - targets[rows].reshape(batch, -1)) ** 2)

    @nnx.jit
    def update(encoder, text_optimizer, head, head_optimizer, key):
        k_rows, k_dropout = jax.random.split(key)
        # Distinct captions for the contrastive batch: a repeated one has two right images.
        rows = (jax.random.choice(k_rows, trained, (batch,), replace=False)
                if objective == "contrastive" else jax.random.randint(k_rows, (batch,), 0, trained))

        def loss(encoder, head):
            rngs = nnx.Rngs(dropout=k_dropout) if dropout else None
            return head_loss(head, encoder(ids[rows], mask[rows], rngs=rngs), rows)

        value, (text_grads, head_grads) = nnx.value_and_grad(loss, argnums=(0, 1))(
            encoder, head)
        text_optimizer.update(encoder, text_grads)
        head_optimizer.update(head, head_grads)
        return value

    key = jax.random.key(7 + seed)
    for i in range(updates):
        value = update(encoder, text_optimizer, head, head_optimizer,
                       jax.random.fold_in(key, i))
        if i % 2048 == 0 or i == updates - 1:
            print(f"pretraining {i + 1}: loss {float(value):.4f}", file=sys.stderr)
    encoder.eval()


def zero_film(flow: nnx.Module) -> int:
    """Start every FiLM projection of a v080 flow at zero, so its pillars start
    unmodulated; returns how many there are (none before v080)."""
    films = [film for block in flow.transformer_blocks for film in getattr(block, "films", ())]
    for film in films:
        film.proj.kernel[...] = jnp.zeros_like(film.proj.kernel[...])
        film.proj.bias[...] = jnp.zeros_like(film.proj.bias[...])
    return len(films)


def timestep_features(t: jax.Array, width: int) -> jax.Array:
    """Sinusoidal features [B, width] of float times t in [0, 1]."""
    half = width // 2
    frequencies = jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / half)
    angles = t[:, None] * 1000.0 * frequencies[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class AdaLNBlock(nnx.Module):
    """A pre-norm transformer block whose norms the conditioning scales, shifts and gates
    (adaLN-Zero: the gates start at zero, so the block starts as the identity)."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.modulation = nnx.Linear(width, 6 * width, kernel_init=nnx.initializers.zeros,
                                     rngs=rngs)
        self.norm1 = nnx.LayerNorm(width, use_scale=False, use_bias=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, use_scale=False, use_bias=False, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
        self.hidden = nnx.Linear(width, 4 * width, rngs=rngs)
        self.out = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array, condition: jax.Array) -> jax.Array:
        modulation = self.modulation(jax.nn.silu(condition))[:, None]
        scale1, shift1, gate1, scale2, shift2, gate2 = jnp.split(modulation, 6, axis=-1)
        x = x + gate1 * self.attention(self.norm1(x) * (1 + scale1) + shift1)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.out(jax.nn.gelu(self.hidden(h)))


class DiTControl(nnx.Module):
    """The control flow: v-prediction [B, T, D] for noisy tokens, caption vector, time."""

    def __init__(self, tokens: int, latent_width: int, caption_width: int, *,
                 width: int = 64, blocks: int = 2, heads: int = 4, rngs: nnx.Rngs):
        self.width = width
        self.embed = nnx.Linear(latent_width, width, rngs=rngs)
        self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (tokens, width)))
        self.caption = nnx.Linear(caption_width, width, rngs=rngs)
        self.time = nnx.Linear(width, width, rngs=rngs)
        self.blocks = nnx.List([AdaLNBlock(width, heads, rngs=rngs) for _ in range(blocks)])
        self.unembed = nnx.Linear(width, latent_width, rngs=rngs)

    def __call__(self, tokens: jax.Array, caption: jax.Array, t: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.positions[...][None]
        condition = self.caption(caption) + self.time(
            jax.nn.silu(timestep_features(t, self.width)))
        for block in self.blocks:
            x = block(x, condition)
        return self.unembed(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--flow", choices=("fluxflow", "dit"), required=True)
    parser.add_argument("--caption", choices=CAPTIONS, required=True)
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"),
                        help="the config whose demo data to train on and hold out")
    parser.add_argument("--flow-version", default=None,
                        help="with --flow fluxflow: this model_version's flow architecture")
    parser.add_argument("--trained", type=int, default=None,
                        help="demo images to train on (default: the config's demo_samples)")
    parser.add_argument("--updates", type=int, default=20480)
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--text-lr", type=float, default=2e-4)
    parser.add_argument("--freeze-language-model", action="store_true")
    parser.add_argument("--no-text-dropout", action="store_true")
    parser.add_argument("--rotate-oracle", action="store_true")
    parser.add_argument("--pretrain-objective", choices=PRETRAIN_OBJECTIVES, default="ngrams")
    parser.add_argument("--pretrain-updates", type=int, default=8192)
    parser.add_argument("--contrastive-batch", type=int, default=CONTRASTIVE_BATCH)
    parser.add_argument("--seed", type=int, default=0,
                        help="another draw of the initial weights and the batches (the "
                             "generations' noise stays)")
    parser.add_argument("--normalise", choices=NORMALISATIONS, default="none")
    parser.add_argument("--flow-lr", type=float, default=FLOW_LR)
    parser.add_argument("--film-start", choices=FILM_STARTS, default="random")
    parser.add_argument("--score-at", type=int, nargs="*", default=[],
                        help="also score the generations after these updates")
    args = parser.parse_args(argv)

    from PIL import Image

    from fluxflow_jax.data.demo import DemoSource, render
    from fluxflow_jax.data.images import to_array
    from fluxflow_jax.evaluation import demo_scorer
    from fluxflow_jax.interop.checkpoint import load_fluxflow
    from fluxflow_jax.models import flow_noise
    from fluxflow_jax.models.bundle import flow_processor
    from fluxflow_jax.pipeline.config import load_config
    from fluxflow_jax.pipeline.setup import load_tokenizer
    from fluxflow_jax.sampling import dpm_solver, to_uint8
    from fluxflow_jax.training import diffusion
    from text_embedding_probe import ATTRIBUTES, probe_accuracy

    data = load_config(args.config).data
    models = load_fluxflow(args.checkpoint)
    compressor, expander, encoder = models.compressor, models.expander, models.text_encoder
    if encoder is None:
        print(f"{args.checkpoint} holds no text encoder", file=sys.stderr)
        return 2
    trained, held = args.trained or data.demo_samples, args.held_out
    source = DemoSource(trained + held, data.img_size, seed=data.seed)
    scenes = [source.scene(i) for i in range(trained + held)]
    images = np.stack([to_array(Image.fromarray(render(scene))) for scene in scenes])
    ids, mask = (jnp.asarray(a) for a in load_tokenizer(data).encode(
        tuple(scene.caption for scene in scenes), data.max_length))
    mask = mask.astype(bool)
    caption_width = models.config.text_embed_dim

    grid = compressor.latent_shape(data.img_size, data.img_size)
    encode = jax.jit(lambda x: compressor.encode(
        x, noise=jnp.zeros((x.shape[0], *grid, compressor.config.vae_dim))).packed)
    packed = jnp.concatenate([encode(jnp.asarray(images[i:i + 256]))
                              for i in range(0, len(images), 256)])
    latents, hw_token = packed[:, :-1], packed[:1, -1:]
    tokens, latent_width = latents.shape[1:]

    oracle = jnp.asarray(np.stack([oracle_vector(s, max(ORACLE_WIDTH, caption_width))
                                   for s in scenes]))
    # The captions as fixed vectors, one row per scene; None: the text encoder trains along.
    table = None
    if args.caption == "oracle":
        table = oracle @ rotation(oracle.shape[1]) if args.rotate_oracle else oracle
    elif args.caption == "pretrained_text_encoder":
        targets = {"ngrams": None, "latents": latents, "contrastive": latents,
                   "oracle": oracle}[args.pretrain_objective]
        pretrain_text_encoder(encoder, ids, mask, args.pretrain_objective, targets, trained,
                              args.pretrain_updates, args.text_lr, not args.no_text_dropout,
                              args.contrastive_batch, args.seed)
        table = np.concatenate([encoder(ids[i:i + 256], mask[i:i + 256])
                                for i in range(0, len(scenes), 256)])
    unnormalised = None if table is None else np.asarray(table)
    if table is not None:
        mean, matrix = normalisation(unnormalised[:trained], args.normalise)
        table = jnp.asarray((unnormalised - mean) @ matrix, jnp.float32)

    if args.flow == "dit":
        flow = DiTControl(tokens, latent_width, caption_width if table is None
                          else table.shape[1], rngs=nnx.Rngs(args.seed))
        predict = lambda f, x, c, t: f(x, c, t)  # noqa: E731
    else:
        if table is not None and table.shape[1] != caption_width:
            print(f"the oracle needs text_embed_dim >= {ORACLE_WIDTH}", file=sys.stderr)
            return 2
        flow_config = models.config.replace(
            model_version=args.flow_version or models.config.model_version)
        flow = flow_processor(flow_config, rngs=nnx.Rngs(args.seed))
        padding = [(0, 0), (0, 0), (0, flow_config.latent_width - latent_width)]

        def predict(f, x, c, t):
            hw = jnp.broadcast_to(hw_token, (x.shape[0], 1, latent_width))
            packed = jnp.pad(jnp.concatenate([x, hw], axis=1), padding)
            return f(packed, c, t, hw=grid)[:, :-1, :latent_width]

    if args.film_start == "zero" and (args.flow == "dit" or not zero_film(flow)):
        print("--film-start zero needs v080's FiLM-modulated pillars: --flow fluxflow "
              "--flow-version 0.8.0", file=sys.stderr)
        return 2

    def noise_tokens(key, rows):
        return flow_noise.tokens(flow_noise.draw(models.config, key, rows, grid), compressor)

    flow_optimizer = nnx.Optimizer(flow, optax.adamw(args.flow_lr, weight_decay=0.0),
                                   wrt=nnx.Param)
    train_text = args.caption == "text_encoder"
    text_dropout = train_text and not args.no_text_dropout
    if text_dropout:
        encoder.train()
    else:
        encoder.eval()
    text_optimizer = nnx.Optimizer(encoder, text_adamw(
        args.text_lr, 0.0 if args.freeze_language_model else 0.01), wrt=nnx.Param)

    def caption_vectors(enc, rows, rngs):
        if table is not None:
            return table[rows]
        if args.freeze_language_model:
            features = jax.lax.stop_gradient(enc.features(ids[rows], mask[rows], rngs=rngs))
            return enc.project(features)
        return enc(ids[rows], mask[rows], rngs=rngs)

    @nnx.jit
    def update(flow, flow_optimizer, enc, text_optimizer, key):
        k_rows, k_time, k_noise, k_keep, k_dropout = jax.random.split(key, 5)
        rows = jax.random.randint(k_rows, (BATCH,), 0, trained)
        t = jax.random.randint(k_time, (BATCH,), 0, diffusion.NUM_TIMESTEPS)
        noise = noise_tokens(k_noise, BATCH)
        x0 = latents[rows]
        noisy = diffusion.add_noise(x0, noise, t, diffusion.NUM_TIMESTEPS)
        target = diffusion.v_target(x0, noise, t, diffusion.NUM_TIMESTEPS)
        keep = jax.random.bernoulli(k_keep, KEEP_CAPTION, (BATCH, 1))

        def loss(flow, enc):
            rngs = None if args.no_text_dropout else nnx.Rngs(dropout=k_dropout)
            captions = jnp.where(keep, caption_vectors(enc, rows, rngs), 0.0)
            v = predict(flow, noisy, captions, diffusion.model_time(t))
            return jnp.mean((v - target) ** 2)

        value, (flow_grads, text_grads) = nnx.value_and_grad(loss, argnums=(0, 1))(flow, enc)
        flow_optimizer.update(flow, flow_grads)
        if train_text:
            text_optimizer.update(enc, text_grads)
        return value

    @nnx.jit
    def generate(flow, enc, rows, noise):
        captions = caption_vectors(enc, rows, None)

        def velocity(x, t):
            return predict(flow, x, captions, jnp.broadcast_to(diffusion.model_time(t),
                                                                (x.shape[0],)))

        x0 = dpm_solver.sample(velocity, noise, SOLVER_STEPS)
        hw = jnp.broadcast_to(hw_token, (x0.shape[0], 1, latent_width))
        return jnp.clip(expander(jnp.concatenate([x0, hw], axis=1), hw=grid), -1, 1)

    noise = jax.jit(noise_tokens, static_argnums=1)(jax.random.key(2026), held)

    def accuracy(first: int, count: int) -> dict[str, float]:
        """The demo scorer's accuracy on generations from captions first..first+count-1."""
        generated = np.concatenate([
            to_uint8(generate(flow, encoder, jnp.arange(first + i, first + min(i + 64, count)),
                              noise[i:i + 64])) for i in range(0, count, 64)])
        return demo_scorer.accuracy(list(generated), scenes[first:first + count])

    def score() -> tuple[dict[str, float], dict[str, float]]:
        """Held-out and trained captions' accuracies, the text encoder in eval mode."""
        encoder.eval()
        return accuracy(trained, held), accuracy(0, min(held, trained))

    start, key, scoring_seconds = time.perf_counter(), jax.random.key(1 + args.seed), 0.0
    for i in range(args.updates):
        loss = update(flow, flow_optimizer, encoder, text_optimizer, jax.random.fold_in(key, i))
        if i % 2048 == 0 or i == args.updates - 1:
            print(f"update {i + 1}: loss {float(loss):.4f}", file=sys.stderr)
        if i + 1 in args.score_at and i + 1 < args.updates:
            scoring_start = time.perf_counter()
            held_out, memorised = score()
            print(f"after {i + 1} updates: " + ", ".join(
                f"{a} {held_out[a]:.1%} / {memorised[a]:.1%}" for a in demo_scorer.ATTRIBUTES),
                flush=True)
            if text_dropout:
                encoder.train()
            scoring_seconds += time.perf_counter() - scoring_start
    train_seconds = time.perf_counter() - start - scoring_seconds

    held_out, memorised = score()
    vectors = table if table is not None else np.concatenate([
        encoder(ids[i:i + 256], mask[i:i + 256]) for i in range(0, len(scenes), 256)])
    readable = {}  # how well a linear map reads each attribute off the caption vectors
    for attribute in ATTRIBUTES:
        labels = [str(getattr(scene, attribute)) for scene in scenes]
        readable[attribute] = probe_accuracy(vectors[:trained], labels[:trained],
                                             vectors[trained:], labels[trained:])
    chance = demo_scorer.chance(scenes[trained:])
    flow_name = args.flow if args.flow == "dit" else f"fluxflow v{flow_config.model_version}"
    print(f"flow {flow_name}, caption {args.caption}, {args.updates} updates "
          f"({train_seconds:.0f} s), {held} held-out captions (trained captions after /)")
    for attribute in demo_scorer.ATTRIBUTES:
        print(f"{attribute:<14} {held_out[attribute]:6.1%} / {memorised[attribute]:6.1%}  "
              f"(chance {chance[attribute]:.1%})")
    print("linear probe of the caption vectors: " + ", ".join(
        f"{attribute} {value:.1%}" for attribute, value in readable.items()))
    raw = np.asarray(vectors if unnormalised is None else unnormalised)[:trained]
    spread = np.linalg.eigvalsh(np.cov(raw, rowvar=False))
    print(f"their variances along their principal directions, before --normalise: min "
          f"{spread.min():.3g}, median {np.median(spread):.3g}, max {spread.max():.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
