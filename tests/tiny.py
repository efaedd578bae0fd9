"""The tiny model configuration unit tests share: every component, a few KiB each."""

from fluxflow_jax.models import FluxFlowConfig

TINY = FluxFlowConfig(vae_dim=16, downscales=2, upscales=2, vae_attn_layers=1, flow_dim=16,
                      flow_attn_heads=2, flow_transformer_layers=1, text_embed_dim=16,
                      text_dim=24, text_heads=2, text_layers=1, text_hidden_dim=32,
                      text_vocab_size=64, text_max_positions=32, text_head_width=8,
                      disc_base_channels=4, disc_depth=2)
