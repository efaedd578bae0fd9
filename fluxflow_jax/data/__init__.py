"""Training data: sources, tokenizer, image transforms and the resumable host loader."""

from fluxflow_jax.data.demo import DemoSource
from fluxflow_jax.data.errors import DataConfigError
from fluxflow_jax.data.folder import CaptionedFolder
from fluxflow_jax.data.loader import Batch, DataLoader, LoaderConfig
from fluxflow_jax.data.noise import NoiseSource
from fluxflow_jax.data.prefetch import prefetch_to_device
from fluxflow_jax.data.samples import BadSampleError, RawSample
from fluxflow_jax.data.tfds_source import TFDSSource
from fluxflow_jax.data.tokenizer import Tokenizer, TokenizerError
from fluxflow_jax.data.webdataset_source import WebDatasetSource

__all__ = ["BadSampleError", "Batch", "CaptionedFolder", "DataConfigError", "DataLoader",
           "DemoSource", "LoaderConfig", "NoiseSource", "RawSample", "TFDSSource", "Tokenizer",
           "TokenizerError", "WebDatasetSource", "prefetch_to_device"]
