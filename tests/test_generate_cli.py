"""``fluxflow-jax generate``: prompts in, one image per prompt out; user errors in one line."""

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from fluxflow_jax.cli import main
from fluxflow_jax.interop import FluxFlowModels, save_fluxflow
from fluxflow_jax.pipeline import memory
from fluxflow_jax.sampling.prompts import PromptError, read_prompts, slug
from tiny import TINY

pytestmark = pytest.mark.filterwarnings("ignore:.*PyTorch fluxflow cannot rebuild")
CONFIG = TINY.replace(text_vocab_size=30522)  # the tokenizer's vocabulary


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    save_fluxflow(path, FluxFlowModels.create(CONFIG, nnx.Rngs(0)))
    return path


def test_images_per_prompt_named_after_it(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "cat.txt").write_text("a photo of\na cat\n")
    out = tmp_path / "out"
    code = main(["generate", "--checkpoint", str(checkpoint), "--prompt", "A red circle!",
                 "--text_prompts_path", str(prompts), "--size", "32x48", "--steps", "3",
                 "--batch_size", "2", "--guidance", "2", "--output_path", str(out)])
    assert code == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["000_a-red-circle.png", "cat.png"]
    assert capsys.readouterr().out.split() == [str(out / name) for name in written]
    for name in written:
        with Image.open(out / name) as image:
            assert image.size == (32, 48) and image.mode == "RGB"
            assert np.asarray(image).std() > 0


@pytest.mark.parametrize("arguments, message", [
    ([], "no prompts: give --prompt, --prompts_file or --text_prompts_path"),
    (["--prompt", "x", "--size", "30x32"], "--size 30x32: height and width must be positive "
                                            "multiples of 4"),
    (["--prompts_file", "missing.txt"], "missing.txt: file not found"),
])
def test_user_errors_are_one_line_with_exit_2(checkpoint, tmp_path, capsys, arguments, message):
    code = main(["generate", "--checkpoint", str(checkpoint), "--output_path",
                 str(tmp_path / "out"), *arguments])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_unusable_checkpoints_are_refused(tmp_path, capsys):
    save_fluxflow(tmp_path / "a", FluxFlowModels.create(
        CONFIG, nnx.Rngs(0), components=("compressor", "flow_processor", "expander")))
    code = main(["generate", "--checkpoint", str(tmp_path / "a"), "--prompt", "x"])
    assert code == 2 and "lacks the text_encoder" in capsys.readouterr().err
    save_fluxflow(tmp_path / "b", FluxFlowModels.create(TINY, nnx.Rngs(0)))
    code = main(["generate", "--checkpoint", str(tmp_path / "b"), "--prompt", "x"])
    assert code == 2 and "64-token vocabulary" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"]) == 2


def test_prompt_sources_and_names(tmp_path):
    (tmp_path / "list.txt").write_text("first prompt\n\n  second  \n")
    prompts = read_prompts(["a/b: c"], tmp_path / "list.txt")
    assert [(p.stem, p.text) for p in prompts] == [
        ("000_a-b-c", "a/b: c"), ("001_first-prompt", "first prompt"),
        ("002_second", "second")]
    assert slug("!!!", 7) == "007_prompt" and len(slug("word " * 40, 1)) <= 4 + 48
    with pytest.raises(PromptError, match="empty prompt"):
        read_prompts(["  "])
    with pytest.raises(PromptError, match="not a directory"):
        read_prompts(prompts_dir=tmp_path / "list.txt")


def test_a_size_that_cannot_fit_is_refused_before_it_runs(checkpoint, tmp_path, capsys,
                                                          monkeypatch):
    """The compiled sampler's memory against the host's (here made tiny): one line naming
    the size and what to change, exit 2, no image."""
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 0)
    out = tmp_path / "out"
    code = main(["generate", "--checkpoint", str(checkpoint), "--prompt", "x", "--size",
                 "20x16", "--steps", "1", "--output_path", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "error: generating 1 image(s) of 20x16 px per batch (1 solver steps) needs " in err
    assert "available host memory; to fit: choose a smaller --size or --batch_size" in err
    assert not list(out.iterdir())
