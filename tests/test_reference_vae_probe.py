"""tools/reference_vae_probe.py: its oracle tokens, its unit-variance rescaling and its
silu start, on the real PyTorch fluxflow networks."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import reference_vae_probe as probe  # noqa: E402


def test_oracle_tokens_are_the_pooled_colours_with_the_hw_token():
    x = probe.images(range(2))
    tokens = probe.oracle_tokens(x, 16)
    assert tokens.shape == (2, 4 * 4 + 1, 16)
    pooled = nn.functional.avg_pool2d(x, 8)  # [2, 3, 4, 4]
    torch.testing.assert_close(tokens[:, 5, :3], pooled[:, :, 1, 1])
    torch.testing.assert_close(tokens[:, 5, 3:6], pooled[:, :, 1, 1])
    assert tokens[0, -1, 0].item() == 4 / 1024 and tokens[0, -1, 2:].abs().sum() == 0


def test_unit_variance_rescales_every_layer_to_std_one():
    torch.manual_seed(0)
    encoder = probe.FluxCompressor(d_model=16, downscales=3, attn_layers=1, attn_heads=2,
                                   use_gradient_checkpointing=False)
    encoder.reparameterize = lambda mu, logvar: mu
    x = probe.images(range(8))
    stds = {}

    def record(layer, _, output):
        stds.setdefault(id(layer), output.std().item())

    def layer_stds():
        stds.clear()
        handles = [m.register_forward_hook(record) for m in encoder.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            encoder(x)
        for handle in handles:
            handle.remove()
        return list(stds.values())

    assert min(layer_stds()) < 0.1  # PyTorch's init: later layers nearly silent
    probe.scale_to_unit_variance(encoder, lambda: encoder(x))
    after = layer_stds()
    assert len(after) > 10
    assert all(abs(std - 1) < 1e-4 for std in after), after


def test_silu_start_turns_each_bezier_activation_into_silu_of_one_projection():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4 * 5, 3, padding=1)
    block = nn.Sequential(layer, probe.BezierActivation(t_pre_activation="tanh",
                                                        p_preactivation="silu"))
    x = torch.randn(2, 3, 8, 8)
    probe.start_as_silu(block)
    weight, bias = layer.weight.view(4, 5, 3, 3, 3), layer.bias.view(4, 5)
    for k in (2, 3, 4):  # the control points share p0's weights
        torch.testing.assert_close(weight[:, k], weight[:, 1])
    assert bias[:, 1:].abs().sum() == 0 and bias[:, 0].abs().sum() > 0  # t keeps its own
    expected = nn.functional.silu(nn.functional.conv2d(x, weight[:, 1], padding=1))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_pass_through_is_the_same_start_in_pytorch_and_in_fluxflow_jax():
    """The probe's PyTorch start and fluxflow-jax's give the same weights from the same
    initial ones, and PyTorch's encoder then carries the pooled image in its latent grid."""
    import numpy as np
    from flax import nnx

    from fluxflow_jax.interop.keymap import compressor_table
    from fluxflow_jax.interop.state import export_tensors
    from fluxflow_jax.models import FluxFlowConfig
    from fluxflow_jax.models.compressor import FluxCompressor
    from fluxflow_jax.models.compressor_start import start_as_pass_through

    config = FluxFlowConfig(vae_dim=16, downscales=3, upscales=3, vae_attn_layers=1,
                            vae_attn_heads=2)
    ours = FluxCompressor(config, rngs=nnx.Rngs(0))
    torch_encoder = probe.FluxCompressor(d_model=16, downscales=3, attn_layers=1,
                                         attn_heads=2, use_gradient_checkpointing=False)
    as_torch = lambda: {k: torch.tensor(v) for k, v in
                        export_tensors(ours, compressor_table(config)).items()}
    torch_encoder.load_state_dict(as_torch())
    probe.start_as_pass_through(torch_encoder)
    start_as_pass_through(ours)
    expected = torch_encoder.state_dict()
    for key, value in as_torch().items():
        torch.testing.assert_close(value, expected[key], atol=1e-7, rtol=0, msg=key)

    x = probe.images(range(32))
    with torch.no_grad():
        h = torch_encoder.add_coord_channels(x)
        for first, down in zip(torch_encoder.encoder_first_step, torch_encoder.encoder_z):
            h = down(first(h))
        latent = torch_encoder.latent_proj(h)
    pooled = nn.functional.avg_pool2d(x, 8)
    for channel in range(3):
        r = np.corrcoef(latent[:, channel].flatten(), pooled[:, channel].flatten())[0, 1]
        assert r > 0.8, (channel, r)
