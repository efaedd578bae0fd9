"""The training modes, in one table: for each, which components its optimizer groups train,
what it needs besides, which metrics the train step reports, which of them the console
shows and under which label, whose averages it keeps, which evaluation parts validate it,
which sample images show it and how the run's plan describes its loss.

A stage's modes follow from its options (``StageConfig.vae`` / ``.flow``): the VAE part
runs the VAE-GAN update, whose switches turn on reconstruction, KL, GAN, LPIPS, the
image-statistics terms and the decoder's SPADE conditioning; the flow part runs the flow
update. The train step, the stage builder, ``validate`` and its plan, the console, the
samples and the transition checks read this table; adding a mode or a metric changes it
and the update that computes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fluxflow_jax.training import diffusion, image_statistics

# The sample images a mode is shown by (``Mode.sampled``).
RECONSTRUCTIONS, GENERATIONS = "reconstructions", "generations"


@dataclass(frozen=True)
class Mode:
    """One row of the table."""

    part: str | None  # the StageConfig options it belongs to ("vae", "flow"); None: always
    on: Callable[[Any], bool] = lambda options: True  # given that part's options
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # group -> trains
    reads: tuple[str, ...] = ()  # components it needs without training them
    metrics: tuple[str, ...] = ()  # the keys the train step reports
    shown: tuple[tuple[str, str], ...] = ()  # (label, metric) the progress line shows
    averaged: tuple[str, ...] = ()  # groups averaged with the part's ``ema_decay``
    validated: tuple[str, ...] = ()  # evaluation parts that measure it
    lpips: bool = False  # needs the LPIPS network
    aliases: Mapping[str, str] = field(default_factory=dict)  # reference name -> metric
    sampled: str | None = None  # the sample images that show it (RECONSTRUCTIONS, ...)
    describe: Callable[[Any], list[str]] = lambda options: []  # its losses, in the plan


def _reconstruction(vae: Any) -> list[str]:
    return [f"reconstruction (L1 + {vae.mse_weight}·MSE"
            + (f" + {vae.lambda_lpips}·LPIPS)" if vae.use_lpips else ")")]


def _statistic(name: str, vae: Any) -> list[str]:
    return [f"{image_statistics.WEIGHTS[name]}·{name}"
            + (" (hard counts, no gradient)" if name == "histogram" and not vae.soft_histogram
               else "")]


def _spade(vae: Any) -> list[str]:
    if not vae.train_spade:
        return ["SPADE off"]
    return ["SPADE on even batches only"] if vae.spade_training_mode == "alternate" else []


def _flow(flow: Any) -> list[str]:
    out = ["flow v-prediction" + (f" + {flow.lambda_align}·alignment"
                                  if flow.lambda_align else "")]
    if (flow.num_train_timesteps, flow.start_step) != (diffusion.NUM_TIMESTEPS, 0):
        out.append(f"timesteps {flow.start_step}..{flow.num_train_timesteps - 1} of "
                   f"{flow.num_train_timesteps}")
    if flow.cfg_dropout_prob:
        out.append(f"text dropout {flow.cfg_dropout_prob}"
                   + (" scaled by timestep" if flow.cfg_dropout_schedule == "timestep"
                      else ""))
    return out


MODES: dict[str, Mode] = {
    "vae": Mode("vae", groups={"vae": ("compressor",)}, reads=("expander",),
                metrics=("loss_recon", "loss_l1", "loss_mse", "loss_lpips", "loss_gen",
                         "loss_disc", "r1_penalty", "weight_recon", "weight_kl", "weight_gan",
                         "grad_norm_vae", "grad_norm_disc", "lr_vae", "lr_disc"),
                averaged=("vae",), validated=("autoencoder",), sampled=RECONSTRUCTIONS,
                aliases={"vae": "loss_recon", "vae_loss": "loss_recon", "recon": "loss_recon",
                         "recon_loss": "loss_recon"}),
    "reconstruction": Mode("vae", lambda vae: vae.train_reconstruction,
                           groups={"vae": ("expander",)}, shown=(("VAE", "loss_recon"),),
                           describe=_reconstruction),
    "kl": Mode("vae", lambda vae: vae.train_kl, metrics=("loss_kl", "kl_beta"),
               shown=(("KL", "loss_kl"),), aliases={"kl": "loss_kl", "kl_loss": "loss_kl"},
               describe=lambda vae: [f"KL (beta {vae.kl_beta}, warm-up "
                                     f"{vae.kl_warmup_steps} updates)"]),
    "gan": Mode("vae", lambda vae: vae.use_gan,
                groups={"vae": ("expander",), "discriminator": ("discriminator",)},
                shown=(("G", "loss_gen"), ("D", "loss_disc")),
                aliases={"generator": "loss_gen", "discriminator": "loss_disc"},
                describe=lambda vae: [f"GAN (lambda_adv {vae.lambda_adv}, R1 {vae.r1_gamma} "
                                      f"every {vae.r1_interval})"]),
    "lpips": Mode("vae", lambda vae: vae.train_reconstruction and vae.use_lpips,
                  shown=(("LPIPS", "loss_lpips"),), lpips=True,
                  aliases={"lpips": "loss_lpips"}),
    **{name: Mode("vae", lambda vae, name=name: name in vae.regularisers,
                  metrics=(f"loss_{name}",),
                  describe=lambda vae, name=name: _statistic(name, vae))
       for name in image_statistics.WEIGHTS},
    # The decoder's SPADE conditioning: on, off, or on alternate batches.
    "spade": Mode("vae", describe=_spade),
    "flow": Mode("flow", groups={"flow": ("flow_processor",),
                                 "text_encoder": ("text_encoder",)},
                 reads=("compressor",),
                 metrics=("flow_loss", "diff_loss", "align_loss", "grad_norm_flow",
                          "grad_norm_text", "lr_flow", "lr_text", "pred_mean", "pred_std"),
                 shown=(("Flow", "flow_loss"),), averaged=("flow", "text_encoder"),
                 validated=("flow", "text_to_image"), aliases={"flow": "flow_loss"},
                 sampled=GENERATIONS, describe=_flow),
    "step": Mode(None, metrics=("skipped",)),  # batches skipped for a non-finite update
}
GROUPS = tuple(dict.fromkeys(g for mode in MODES.values() for g in mode.groups))
# The reference's transition metric names -> the metric the train step reports.
METRIC_ALIASES = {name: metric for mode in MODES.values()
                  for name, metric in mode.aliases.items()}
# A pipeline step's mode keys (the reference's): the part each runs and the components it
# counts as training when checking freezes (the reference's rule: the text encoder never
# counts, so it can always be frozen).
STEP_MODES: dict[str, tuple[str, tuple[str, ...]]] = {
    "train_vae": ("vae", ("compressor", "expander")),
    "gan_training": ("vae", ("discriminator",)),
    "train_spade": ("vae", ()),
    "train_diff": ("flow", ("flow_processor",)),
    "train_diff_full": ("flow", ("flow_processor",)),
    "train_flow": ("flow", ("flow_processor",)),
}


def active(vae: Any = None, flow: Any = None) -> tuple[Mode, ...]:
    """The modes on for these options (None: that part does not run)."""
    options = {"vae": vae, "flow": flow}
    return tuple(mode for mode in MODES.values()
                 if mode.part is None or (options[mode.part] is not None
                                          and mode.on(options[mode.part])))


def part_metrics(part: str, options: Any) -> tuple[str, ...]:
    """The metrics one part's update reports."""
    return tuple(m for mode in active(**{part: options}) if mode.part == part
                 for m in mode.metrics)


def metric_names(vae: Any, flow: Any) -> tuple[str, ...]:
    """The keys a step's metrics dict holds."""
    return tuple(m for mode in active(vae, flow) for m in mode.metrics)


def shown(vae: Any, flow: Any) -> tuple[tuple[str, str], ...]:
    """(label, metric) of each loss the progress line shows, in its order: the losses the
    stage trains."""
    return tuple(pair for mode in active(vae, flow) for pair in mode.shown)


def sampled(vae: Any, flow: Any) -> tuple[str, ...]:
    """The sample images that show what the stage trains (RECONSTRUCTIONS, GENERATIONS)."""
    return tuple(dict.fromkeys(mode.sampled for mode in active(vae, flow) if mode.sampled))


def losses(vae: Any, flow: Any) -> list[str]:
    """The plan's description of each loss term the stage trains, in the table's order."""
    options = {"vae": vae, "flow": flow}
    return [term for mode in active(vae, flow)
            for term in mode.describe(options.get(mode.part))]


def group_components(vae: Any, flow: Any) -> dict[str, tuple[str, ...]]:
    """The components each optimizer group of the stage trains, frozen ones included."""
    groups: dict[str, dict[str, None]] = {}
    for mode in active(vae, flow):
        for group, components in mode.groups.items():
            groups.setdefault(group, {}).update(dict.fromkeys(components))
    return {group: tuple(components) for group, components in groups.items()}


def required_components(vae: Any, flow: Any) -> set[str]:
    """The components the stage cannot run without."""
    return {c for mode in active(vae, flow)
            for c in (*mode.reads, *(c for cs in mode.groups.values() for c in cs))}


def ema_decays(vae: Any, flow: Any) -> dict[str, float | None]:
    """Each optimizer group's EMA decay (None: no average)."""
    options = {"vae": vae, "flow": flow}
    decays: dict[str, float | None] = dict.fromkeys(GROUPS)
    for mode in active(vae, flow):
        if mode.averaged:
            decays.update(dict.fromkeys(mode.averaged, options[mode.part].ema_decay))
    return decays


def validated_parts(vae: Any, flow: Any) -> tuple[str, ...]:
    """The evaluation parts that measure what the stage trains."""
    return tuple(p for mode in active(vae, flow) for p in mode.validated)


def uses_lpips(vae: Any, flow: Any) -> bool:
    """Whether a loss of the stage needs the LPIPS network."""
    return any(mode.lpips for mode in active(vae, flow))
