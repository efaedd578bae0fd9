"""The TFDS source, over a tiny dataset prepared here as ArrayRecord files without TensorFlow."""

import io
import sys

import numpy as np
import pytest
from PIL import Image

from fluxflow_jax.data.errors import DataConfigError
from fluxflow_jax.data.samples import BadSampleError, decode_image
from fluxflow_jax.data.tfds_source import TFDSSource

tfds = pytest.importorskip("tensorflow_datasets")

NAME = "fluxflow_tiny_captions"
CAPTIONS = ["a red square", "", "two\nlines", "a blue one"]


def png(index):
    buffer = io.BytesIO()
    Image.fromarray(np.full((4 + index, 6, 3), 10 * index, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()  # bytes: encoding arrays would need TensorFlow's PNG encoder


class FluxflowTinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Registered nowhere, so reading it goes through the prepared files alone, as a user's
    prepared dataset would."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "label": tfds.features.Scalar(np.int64),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index, caption in enumerate(CAPTIONS):
            yield index, {"image": png(index), "caption": caption, "label": index}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    FluxflowTinyCaptions(data_dir=path, file_format="array_record").download_and_prepare()
    return str(path)


def by_label(source):
    """{label: index}: preparation shuffles the examples, so look them up by their label."""
    reader = tfds.data_source(NAME, split="train", data_dir=source, download=False)
    return {int(reader[i]["label"]): i for i in range(len(reader))}


def test_samples_have_encoded_images_and_text_captions(data_dir):
    source = TFDSSource(NAME, data_dir=data_dir, fixed_prompt_prefix="flat")
    index = by_label(data_dir)
    assert len(source) == len(CAPTIONS)
    red, two_lines = source[index[0]], source[index[2]]
    assert red.caption == "flat. a red square" and two_lines.caption == "flat. two lines"
    assert red.key == f"{NAME}/train[{index[0]}]"
    assert isinstance(red.image, bytes)
    image = decode_image(two_lines)
    assert image.size == (6, 6) and image.getpixel((0, 0)) == (20, 20, 20)
    assert [source.image_size(index[label]) for label in range(4)] == [
        (4, 6), (5, 6), (6, 6), (7, 6)]
    assert "tensorflow" not in sys.modules


def test_empty_caption_is_a_bad_sample(data_dir):
    source = TFDSSource(NAME, data_dir=data_dir)
    with pytest.raises(BadSampleError, match=r"\[\d\]: empty caption"):
        source[by_label(data_dir)[1]]


def test_split_slices_work(data_dir):
    assert len(TFDSSource(NAME, split="train[:3]", data_dir=data_dir)) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"image_key": "img"}, "no feature 'img'; set image_key to one of: caption, image, label"),
    ({"caption_key": "text"}, "no feature 'text'; set caption_key to one of: caption, image,"),
    ({"split": "test"}, "split 'test': Unknown split 'test'"),
])
def test_configuration_mistakes_are_named(data_dir, kwargs, message):
    with pytest.raises(DataConfigError) as err:
        TFDSSource(NAME, data_dir=data_dir, **kwargs)
    assert message in str(err.value)


def test_unknown_or_unprepared_datasets_are_config_errors(data_dir, tmp_path):
    with pytest.raises(DataConfigError, match=f"'no_such_set' not found in {data_dir}"):
        TFDSSource("no_such_set", data_dir=data_dir)
    with pytest.raises(DataConfigError, match="'mnist' is not prepared in .*array_record"):
        TFDSSource("mnist", data_dir=str(tmp_path))
