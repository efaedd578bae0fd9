"""FluxFlow networks as Flax NNX modules: architecture only, NHWC, explicit randomness."""

from fluxflow_jax.models.bezier import TrainableBezier, bezier, bezier_activation
from fluxflow_jax.models.bundle import COMPONENTS, FluxFlowModels
from fluxflow_jax.models.compressor import Encoded, FluxCompressor
from fluxflow_jax.models.conditioning import SPADE, ContextAttentionMixer, GatedContextInjection
from fluxflow_jax.models.config import FluxFlowConfig
from fluxflow_jax.models.discriminator import PatchDiscriminator, SpectralState
from fluxflow_jax.models.expander import FluxExpander
from fluxflow_jax.models.flow import FluxFlowProcessor
from fluxflow_jax.models.layers import Buffer
from fluxflow_jax.models.text_encoder import BertTextEncoder

__all__ = [
    "BertTextEncoder", "Buffer", "COMPONENTS", "FluxFlowModels", "ContextAttentionMixer", "Encoded",
    "FluxCompressor", "FluxExpander", "FluxFlowConfig", "FluxFlowProcessor",
    "GatedContextInjection", "PatchDiscriminator", "SPADE", "SpectralState", "TrainableBezier",
    "bezier", "bezier_activation",
]
