"""The README's quickstart: configs/quickstart.yaml trains all three stages."""

from __future__ import annotations

from pathlib import Path

from fluxflow_jax import cli
from fluxflow_jax.interop import load_fluxflow
from pipeline_helpers import records

def test_quickstart_runs_every_stage(tmp_path, lpips_files, monkeypatch, capsys):
    """configs/quickstart.yaml as the README runs it, one batch per stage (--max_steps)."""
    monkeypatch.setenv("FLUXFLOW_JAX_CACHE", str(lpips_files["weights"].parent))
    quickstart = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    out = tmp_path / "quickstart"
    assert cli.main(["validate", str(quickstart)]) == 0
    assert cli.main(["train", "--config", str(quickstart), "--max_steps", "1",
                     "--output_path", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Step vae_gan (2/3)" in printed and "LPIPS:" in printed
    for stage in ("vae_warmup", "vae_gan", "flow"):
        assert (out / f"flxflow_step_{stage}_final.safetensors").is_file()
        assert len(records(out, stage)) == 1
        assert (out / "graph" / f"training_losses_{stage}.png").is_file()
    assert (out / "graph" / "training_overview.png").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "sample_flow_epoch_1_batch_1_64x64.png", "sample_vae_gan_epoch_1_batch_1_vae.png",
        "sample_vae_warmup_epoch_1_batch_1_vae.png"]
    loaded = load_fluxflow(out)
    assert set(loaded.present()) == {"compressor", "flow_processor", "expander",
                                     "text_encoder", "discriminator"}
    # v060's bounded latent tokens keep the flow's target small (v030's reach 10^3-10^11).
    assert loaded.config.model_version == "0.6.0"
    assert 0 < records(out, "flow")[0]["metrics"]["flow_loss"] < 10
