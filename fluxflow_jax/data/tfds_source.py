"""A prepared TensorFlow Datasets dataset, read by random access without TensorFlow.

``tfds`` reads ArrayRecord files through its data sources with numpy alone. The dataset must
already be prepared in ``data_dir`` with ``file_format="array_record"``: this source never
downloads (a training run should not start fetching a dataset of hundreds of GiB). Images
are read still encoded (``SkipDecoding``), so indexing a sample and reading its size stay
cheap and the decoding happens in the loader's workers like for every other source.
"""

from __future__ import annotations

from fluxflow_jax.data.captions import finish_caption
from fluxflow_jax.data.errors import DataConfigError
from fluxflow_jax.data.samples import BadSampleError, RawSample, header_size


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataConfigError(
            "TFDS sources need tensorflow-datasets and array-record: "
            "pip install 'fluxflow-jax[tfds]'"
        ) from None
    return tfds


class TFDSSource:
    """Random-access source over split ``split`` of the TFDS dataset ``name``."""

    def __init__(
        self,
        name: str,
        *,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        caption_key: str = "caption",
        fixed_prompt_prefix: str | None = None,
    ):
        tfds = _import_tfds()
        where = f"in {data_dir}" if data_dir else "in the default TFDS data_dir"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise DataConfigError(f"TFDS dataset {name!r} not found {where}") from None
        if not builder.is_prepared():
            raise DataConfigError(
                f"TFDS dataset {name!r} is not prepared {where}; prepare it first with "
                "download_and_prepare(file_format='array_record')"
            )
        features = builder.info.features
        for option, key in (("image_key", image_key), ("caption_key", caption_key)):
            if key not in features:
                raise DataConfigError(
                    f"TFDS dataset {name!r} has no feature {key!r}; set {option} to one of: "
                    + ", ".join(sorted(features.keys()))
                )
        self._image_shape = getattr(features[image_key], "shape", None)
        encoded = isinstance(features[image_key], tfds.features.Image)
        try:
            self._source = builder.as_data_source(
                split=split, decoders={image_key: tfds.decode.SkipDecoding()} if encoded else None
            )
        except (ValueError, NotImplementedError) as err:  # unknown split, not ArrayRecord
            raise DataConfigError(f"TFDS dataset {name!r} split {split!r}: {err}") from None
        self._name = f"{name}/{split}"
        self._image_key, self._caption_key = image_key, caption_key
        self._prefix = fixed_prompt_prefix

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> RawSample:
        """The sample's encoded image bytes (or pixels, for a non-Image feature) and caption."""
        example = self._source[index]
        key = f"{self._name}[{index}]"
        text = example[self._caption_key]
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise BadSampleError(key, "caption is not UTF-8 text") from None
        if not isinstance(text, str):
            raise BadSampleError(key, f"caption is {type(text).__name__}, not text")
        return RawSample(key, example[self._image_key], finish_caption(key, text, self._prefix))

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width): from the feature when every image has the same size, otherwise
        from the image header (or array shape); ``BadSampleError`` when that cannot be
        read."""
        if self._image_shape and None not in self._image_shape[:2]:
            return tuple(self._image_shape[:2])
        return header_size(self._source[index][self._image_key], f"{self._name}[{index}]")
