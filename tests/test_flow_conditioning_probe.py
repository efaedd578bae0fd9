"""tools/flow_conditioning_probe.py: its oracle spells each caption out, its DiT control
starts as the identity in every block and learns, a text encoder pretrained on its own
learns its objective, and every flow and caption runs end to end."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from fluxflow_jax.data.demo import COLOURS, POSITIONS, SHAPES, DemoSource
from fluxflow_jax.interop import FluxFlowModels, save_fluxflow
from tiny import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import flow_conditioning_probe as probe  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*PyTorch fluxflow cannot rebuild")
CONFIG = TINY.replace(text_vocab_size=30522, text_embed_dim=probe.ORACLE_WIDTH)


def test_oracle_vector_spells_out_the_scene():
    source = DemoSource(64, 32, seed=42)
    two_tone = next(s for s in map(source.scene, range(64)) if len(s.background) == 2)
    vector = probe.oracle_vector(two_tone, 40)
    colours, positions = list(COLOURS), list(POSITIONS)
    assert vector.shape == (40,) and not vector[32:].any()
    assert np.flatnonzero(vector[:12]).tolist() == [colours.index(two_tone.colour)]
    assert np.flatnonzero(vector[12:21]).tolist() == [positions.index(two_tone.position)]
    top = np.asarray(COLOURS[two_tone.background[0]]) / 127.5 - 1
    bottom = np.asarray(COLOURS[two_tone.background[1]]) / 127.5 - 1
    np.testing.assert_allclose(vector[21:27], np.r_[top, bottom], atol=1e-6)
    assert np.flatnonzero(vector[27:32]).tolist() == [SHAPES.index(two_tone.shape)]


def test_ngram_targets_mark_words_and_neighbouring_pairs_not_padding():
    import jax.numpy as jnp

    ids = jnp.array([[101, 2417, 4418, 102, 0, 0], [101, 4418, 2417, 102, 0, 0]])
    mask = ids != 0
    targets = np.asarray(probe.ngram_targets(ids, mask, buckets=4096))
    assert targets.shape == (2, 4096) and set(np.unique(targets)) == {0.0, 1.0}
    assert targets.sum(axis=1).tolist() == [7, 7]  # 4 words, 3 pairs; no padding
    words = {101 % 4096, 2417, 4418 % 4096, 102}
    assert words <= set(np.flatnonzero(targets[0])) and words <= set(np.flatnonzero(targets[1]))
    assert (targets[0] != targets[1]).any()  # the same words in another order: other pairs


def test_contrastive_loss_asks_each_caption_to_pick_out_its_own_image():
    import jax.numpy as jnp

    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    sharp = jnp.log(100.0)
    assert float(probe.contrastive_loss(x, x, sharp)) < 0.05
    assert float(probe.contrastive_loss(x, x[::-1], sharp)) > 5
    alike = np.ones((8, 16), np.float32)  # nothing tells the images apart: chance, log 8
    np.testing.assert_allclose(probe.contrastive_loss(alike, alike, sharp), np.log(8),
                               rtol=1e-5)


def test_normalisations_and_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 6)) @ rng.normal(size=(6, 6)) * [10, 1, 0.1, 1, 1, 3] + 5
    mean, matrix = probe.normalisation(x, "none")
    np.testing.assert_array_equal((x - mean) @ matrix, x)
    mean, matrix = probe.normalisation(x, "scale")
    scaled = (x - mean) @ matrix
    np.testing.assert_allclose(scaled.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(np.trace(np.cov(scaled, rowvar=False)), 6, rtol=1e-4)
    np.testing.assert_allclose(np.corrcoef(scaled, rowvar=False), np.corrcoef(x, rowvar=False),
                               atol=1e-6)  # the same shape, one scale
    mean, matrix = probe.normalisation(x, "standardise")
    standard = (x - mean) @ matrix
    np.testing.assert_allclose(np.diag(matrix) ** -2, x.var(axis=0, ddof=1), rtol=1e-4)
    assert np.count_nonzero(matrix - np.diag(np.diag(matrix))) == 0  # one scale per component
    np.testing.assert_allclose(np.cov(standard, rowvar=False).diagonal(), 1, rtol=1e-4)
    mean, matrix = probe.normalisation(x, "whiten")
    white = (x - mean) @ matrix
    np.testing.assert_allclose(white.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(6), atol=1e-2)
    q = probe.rotation(6)
    np.testing.assert_allclose(q @ q.T, np.eye(6), atol=1e-5)
    assert np.abs(q).max() < 0.99  # spread: no component left on its own axis


def test_dit_control_starts_as_identity_blocks_that_know_positions():
    import jax
    import jax.numpy as jnp

    flow = probe.DiTControl(16, 4, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 16, 4))
    t = jnp.array([0.2, 0.9])
    a = flow(x, jnp.zeros((2, 8)), t)
    b = flow(x, jnp.ones((2, 8)), t[::-1])
    np.testing.assert_allclose(a, b, atol=1e-6)  # zero gates: neither caption nor time yet
    shifted = flow(jnp.roll(x, 1, axis=1), jnp.zeros((2, 8)), t)
    assert float(jnp.abs(shifted - jnp.roll(a, 1, axis=1)).max()) > 1e-3  # position table


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    save_fluxflow(root / "model", FluxFlowModels.create(CONFIG, nnx.Rngs(0)))
    config = root / "config.yaml"
    config.write_text("data:\n  use_demo: true\n  demo_samples: 8\n  img_size: 32\n"
                      "  max_length: 32\n")
    return root / "model", config


def _run(setup, capsys, *args: str) -> tuple[str, str]:
    checkpoint, config = setup
    code = probe.main([str(checkpoint), "--config", str(config), "--held-out", "4", *args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out, out.err


def test_dit_with_the_oracle_learns(setup, capsys):
    out, err = _run(setup, capsys, "--flow", "dit", "--caption", "oracle", "--updates", "300",
                    "--score-at", "150", "300")
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", err)]
    assert len(losses) == 2 and losses[1] < 0.5 * losses[0]
    # scored midway too; the last update's score is the final report
    scored = r"\d+\.\d% / \d+\.\d%"
    assert re.findall(rf"^after (\d+) updates: background {scored}, shape_colour {scored}, "
                      rf"position {scored}$", out, re.M) == ["150"]
    for name in ("background", "shape_colour", "position"):
        assert re.search(rf"^{name} +\d+\.\d% / +\d+\.\d%  \(chance \d+\.\d%\)$", out,
                         re.M)


def test_seed_draws_other_weights_and_batches(setup, capsys):
    first = [_run(setup, capsys, "--flow", "dit", "--caption", "oracle", "--updates", "1",
                  "--seed", seed)[1] for seed in ("0", "0", "1")]
    assert first[0] == first[1] != first[2]


@pytest.mark.parametrize("version, caption", [(None, "text_encoder"), ("0.8.0", "oracle")])
def test_fluxflow_flows_run(setup, capsys, version, caption):
    """The checkpoint's own v060 flow, and v080's on its tokens padded to v080's width."""
    chosen = ["--flow-version", version] if version else []
    out, _ = _run(setup, capsys, "--flow", "fluxflow", *chosen, "--caption", caption,
                  "--updates", "2")
    assert f"flow fluxflow v{version or '0.6.0'}, caption {caption}, 2 updates" in out


@pytest.mark.parametrize("objective", probe.PRETRAIN_OBJECTIVES)
def test_pretrained_text_encoder_learns_its_objective_then_conditions_the_flow(
        setup, capsys, objective):
    out, err = _run(setup, capsys, "--flow", "dit", "--caption", "pretrained_text_encoder",
                    "--pretrain-objective", objective, "--pretrain-updates", "200",
                    "--text-lr", "2e-3", "--no-text-dropout", "--normalise", "whiten",
                    "--updates", "2")
    losses = [float(v) for v in re.findall(r"pretraining \d+: loss (\d+\.\d+)", err)]
    assert len(losses) == 2 and losses[1] < 0.7 * losses[0]
    assert "caption pretrained_text_encoder, 2 updates" in out
    assert re.search(r"^linear probe of the caption vectors: background \d+\.\d%, colour",
                     out, re.M)
    assert re.search(r"^their variances along their principal directions, before --normalise: "
                     r"min \S+, median \S+, max \S+$", out, re.M)


def test_a_v080_checkpoint_trains_its_own_flow_on_its_wider_tokens(tmp_path, setup, capsys):
    """v070's and v080's compressors add context channels after sampling the latent."""
    save_fluxflow(tmp_path / "v080", FluxFlowModels.create(
        CONFIG.replace(model_version="0.8.0"), nnx.Rngs(0)))
    code = probe.main([str(tmp_path / "v080"), "--config", str(setup[1]), "--held-out", "4",
                       "--flow", "fluxflow", "--caption", "oracle", "--updates", "2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "flow fluxflow v0.8.0, caption oracle, 2 updates" in out.out


def test_checkpoint_without_text_encoder_is_refused(setup, tmp_path, capsys):
    bare = FluxFlowModels.create(CONFIG, nnx.Rngs(0))
    bare.text_encoder = None
    save_fluxflow(tmp_path / "bare", bare)
    assert probe.main([str(tmp_path / "bare"), "--flow", "dit", "--caption", "oracle",
                       "--config", str(setup[1])]) == 2
    assert "holds no text encoder" in capsys.readouterr().err


def test_zero_film_start_leaves_v080_pillars_unmodulated_by_the_caption():
    import jax
    import jax.numpy as jnp

    from fluxflow_jax.models.bundle import flow_processor

    config = CONFIG.replace(model_version="0.8.0")
    flow = flow_processor(config, rngs=nnx.Rngs(0))
    assert probe.zero_film(flow) == 4 * config.flow_transformer_layers
    gate = jax.random.uniform(jax.random.key(0), (2, 5, config.flow_dim))
    film = flow.transformer_blocks[0].films[0]
    conditioning = jax.random.normal(jax.random.key(1), (2, config.flow_dim))
    np.testing.assert_array_equal(film(gate, conditioning), gate)
    assert probe.zero_film(flow_processor(CONFIG, rngs=nnx.Rngs(0))) == 0  # v060: no FiLM


def test_zero_film_start_trains_v080_and_is_refused_without_film(setup, capsys):
    out, _ = _run(setup, capsys, "--flow", "fluxflow", "--flow-version", "0.8.0",
                  "--caption", "oracle", "--film-start", "zero", "--flow-lr", "1e-3",
                  "--updates", "2")
    assert "flow fluxflow v0.8.0, caption oracle, 2 updates" in out
    checkpoint, config = setup
    for flow in ("fluxflow", "dit"):  # v060's flow and the DiT have no FiLM
        assert probe.main([str(checkpoint), "--config", str(config), "--flow", flow,
                           "--caption", "oracle", "--film-start", "zero"]) == 2
        assert "--film-start zero needs v080's FiLM-modulated pillars" in \
            capsys.readouterr().err
