"""``FluxFlowModels``: the set of networks that make up one FluxFlow model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from flax import nnx

from fluxflow_jax.models.compressor import FluxCompressor
from fluxflow_jax.models.config import WEIGHTLESS_FIELDS, FluxFlowConfig
from fluxflow_jax.models.discriminator import PatchDiscriminator
from fluxflow_jax.models.expander import FluxExpander
from fluxflow_jax.models.flow import FluxFlowProcessor
from fluxflow_jax.models.pillar_flow import PillarFilmFlowProcessor
from fluxflow_jax.models.text_encoder import BertTextEncoder


def flow_processor(config: FluxFlowConfig, *, rngs: nnx.Rngs) -> FluxFlowProcessor:
    """The flow processor of ``config``'s architecture version."""
    if config.architecture.pillar_film:
        return PillarFilmFlowProcessor(config, rngs=rngs)
    return FluxFlowProcessor(config, rngs=rngs)


# How each component is built from a config.
COMPONENT_CLASSES: dict[str, Callable[..., nnx.Module]] = {
    "compressor": FluxCompressor,
    "flow_processor": flow_processor,
    "expander": FluxExpander,
    "text_encoder": BertTextEncoder,
    "discriminator": PatchDiscriminator,
}
COMPONENTS = tuple(COMPONENT_CLASSES)


@dataclass
class FluxFlowModels:
    """The networks of one model; a component a checkpoint does not hold is None."""

    config: FluxFlowConfig
    compressor: FluxCompressor | None = None
    flow_processor: FluxFlowProcessor | None = None
    expander: FluxExpander | None = None
    text_encoder: BertTextEncoder | None = None
    discriminator: PatchDiscriminator | None = None

    @classmethod
    def create(cls, config: FluxFlowConfig, rngs: nnx.Rngs,
               components: tuple[str, ...] = COMPONENTS) -> "FluxFlowModels":
        """Freshly initialised networks (PyTorch-style init) for the named components."""
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; valid: {list(COMPONENTS)}")
        return cls(config, **{name: COMPONENT_CLASSES[name](config, rngs=rngs)
                              for name in components})

    def present(self) -> dict[str, nnx.Module]:
        """The components that exist, by name."""
        return {name: getattr(self, name) for name in COMPONENTS
                if getattr(self, name) is not None}

    def with_settings(self, **fields: Any) -> "FluxFlowModels":
        """These networks under a config that differs in fields that shape no weight
        (``WEIGHTLESS_FIELDS``)."""
        shaping = sorted(set(fields) - set(WEIGHTLESS_FIELDS))
        if shaping:
            raise ValueError(f"{shaping} shape the weights; build new networks to change them")
        self.config = dataclasses.replace(self.config, **fields)
        for module in self.present().values():
            if hasattr(module, "config"):  # the discriminator keeps none
                module.config = self.config
        return self

    def eval(self) -> "FluxFlowModels":
        for module in self.present().values():
            module.eval()
        return self

    def train(self) -> "FluxFlowModels":
        for module in self.present().values():
            module.train()
        return self
