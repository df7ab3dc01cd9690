"""Inversion-DPO (Li et al., ACM MM 2025, arXiv 2507.11554): DPO on the reference's DDIM inversion of each sample.

METHODS.md section 4, ``[code]`` (the authors' ``train_ddim.py``). Diffusion-DPO trains on ``x_t`` drawn from
``q(x_t | x0)``; Inversion-DPO replaces the draw by the deterministic DDIM inversion of ``x0`` by the frozen
reference, and compares winner and loser over the inversion's steps.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import Tensor, nn

from lightning_pref.backbones.base import Conditioning, concat_conditioning, conditioning_in, parameter_dtype
from lightning_pref.batch import PIXELS, pair_media
from lightning_pref.errors import ConfigError, check_whole_numbers
from lightning_pref.losses.inversion_dpo import InversionSign, check_inversion_sign, inversion_dpo_loss
from lightning_pref.methods.base import PreferenceDiffusionModule
from lightning_pref.methods.step import NoisySamples, SampleErrors, Samples, mean_squared_error
from lightning_pref.processes import DDIMInversion, ddim_invert
from lightning_pref.seeding import PairRandomness

log = logging.getLogger(__name__)

InversionTarget = Literal["inverted_noise", "reference"]
UnconditionalBranch = Literal["empty_prompt", "zeros"]
LoserInversionPrompt = Literal["caption", "empty"]


@dataclass
class InvertedSamples(NoisySamples):
    """[`NoisySamples`][lightning_pref.methods.step.NoisySamples] of ``K`` inverted points per sample: row
    ``r * K + k`` is sample ``r``'s ``k``-th trained step (winners' rows first), ``noise`` and ``target`` are the
    epsilon the policy regresses on. ``cached_fraction``: the share of samples whose inversion came from the
    cache (``None`` without one)."""

    cached_fraction: float | None = None


def frozen_tensors(network: nn.Module, exclude: set[int]) -> list[Tensor]:
    """The parameters and buffers of ``network`` outside ``exclude`` (ids): the reference's weights, once the
    policy's trained parameters are excluded."""
    return [tensor for tensor in (*network.parameters(), *network.buffers()) if id(tensor) not in exclude]


def weights_version(network: nn.Module, exclude: set[int]) -> tuple[int, int]:
    """How many [`frozen_tensors`][lightning_pref.methods.inversion_dpo.frozen_tensors] ``network`` has, and the sum
    of their in-place write counters (``Tensor._version``): it grows whenever one of them is overwritten in place
    (``install()`` copies a snapshot into the reference, ``load_state_dict``), and stays put when they only move
    between devices or dtypes. Conservative: a write to any frozen tensor of the network counts, whether the
    reference uses it (its weights, a LoRA snapshot adapter) or not (another frozen adapter)."""
    tensors = frozen_tensors(network, exclude)
    return len(tensors), sum(tensor._version for tensor in tensors)


class InversionCache:
    """The reference's DDIM inversions of the last ``capacity`` samples (least recently used dropped), on the CPU,
    and, with a ``directory``, every inversion made, on disk.

    An entry is keyed by a hash of the sample's clean latent and its inversion conditioning (so a changed sample,
    crop or dropped caption is a new entry) and holds the sample's
    [`trained_points`][lightning_pref.methods.inversion_dpo.InversionDPO.trained_points] at all ``N`` steps (``N``
    latents, and ``N`` noise predictions for ``target="reference"``). Every entry is of one reference version
    ([`weights_version`][lightning_pref.methods.inversion_dpo.weights_version]): a changed reference empties the
    memory.

    On disk an entry is ``<directory>/<inversion>/<key>.safetensors``, where ``<inversion>`` is a hash of the
    reference's weights and of the inversion's settings (``settings``): runs that invert the same samples with the
    same reference share their inversions (the seeds of a sweep, a resumed or repeated fit), and a changed
    reference or setting starts a new folder. Its samples are inverted ``INVERSION_CHUNK`` at a time, so a file
    holds the same numbers whichever run wrote it. A file is written under a temporary name and renamed, so processes
    sharing the directory never read half a file; one that cannot be read is counted in ``unreadable``, inverted
    again and rewritten.
    """

    def __init__(self, capacity: int, directory: str | Path | None = None, settings: str = ""):
        self.capacity = capacity
        self.directory = Path(directory) if directory is not None else None
        self.settings = settings
        self.entries: OrderedDict[str, tuple[Tensor, ...]] = OrderedDict()
        self.version: tuple[int, int] | None = None
        self.folder: Path | None = None
        self.unreadable = 0

    def __len__(self) -> int:
        return len(self.entries)

    def use_version(self, version: tuple[int, int], weights: Callable[[], list[Tensor]]) -> None:
        """Empty the memory if the reference is not the one its entries were inverted by; with a directory, move
        to the folder of this reference's ``weights`` (hashed only when the version changes)."""
        if version == self.version:
            return
        self.entries.clear()
        self.version = version
        if self.directory is not None:
            digest = hashlib.blake2b(self.settings.encode(), digest_size=16)
            for tensor in weights():
                digest.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self.folder = self.directory / digest.hexdigest()
            self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def keys(x0: Tensor, conditioning: Conditioning) -> list[str]:
        """One content hash per row of ``x0`` and ``conditioning``."""
        parts = [x0.detach().cpu()] + [conditioning[name].detach().cpu() for name in sorted(conditioning)]
        keys = []
        for row in range(x0.shape[0]):
            digest = hashlib.blake2b(digest_size=16)
            for part in parts:
                digest.update(repr((part.dtype, tuple(part.shape[1:]))).encode())
                digest.update(part[row].contiguous().view(torch.uint8).numpy().tobytes())
            keys.append(digest.hexdigest())
        return keys

    def get(self, key: str) -> tuple[Tensor, ...] | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry
        if self.folder is None or not (self.folder / f"{key}.safetensors").exists():
            return None
        try:
            stored = load((self.folder / f"{key}.safetensors").read_bytes())  # read whole: no map of a shared file
            entry = tuple(stored[str(part)] for part in range(len(stored)))
        except (OSError, KeyError, SafetensorError) as error:
            self.unreadable += 1
            log.warning("inversion cache: %s is unreadable (%s); inverting the sample again", key, error)
            return None
        self.remember(key, entry)
        return entry

    def put(self, key: str, per_step: tuple[Tensor, ...]) -> None:
        entry = tuple(tensor.detach().to("cpu", copy=True) for tensor in per_step)  # not views of a batch
        self.remember(key, entry)
        if self.folder is not None:
            temporary = self.folder / f".{key}.{os.getpid()}.tmp"
            save_file({str(part): tensor for part, tensor in enumerate(entry)}, temporary)
            os.replace(temporary, self.folder / f"{key}.safetensors")

    def remember(self, key: str, entry: tuple[Tensor, ...]) -> None:
        if not self.capacity:
            return
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


class InversionDPO(PreferenceDiffusionModule):
    """Inversion-DPO ``[code]``. Per step, for ``B`` pairs:

    1. ``noise_samples``: the reference inverts each winner and loser by deterministic DDIM
       ([`ddim_invert`][lightning_pref.processes.ddim_invert]: ``num_inversion_steps`` ``N``, leading spacing
       ``k = 1000 // N``, the first step the identity, classifier-free guidance ``guidance_scale``), giving
       ``z_0 = x0, z_1, ..., z_N`` and the noise predictions ``e_0 .. e_{N-1}``; each pair trains on all ``N``
       steps, or on ``timesteps_per_step`` of them drawn from its own stream (the same for its winner and loser);
    2. ``sample_errors``: the policy's guided noise prediction (with gradient, through both branches of
       ``e_u + g (e_c - e_u)``) and, for ``target="inverted_noise"``, the reference's, on each trained point;
       per-row errors in epsilon units;
    3. ``compute_loss``: [`inversion_dpo_loss`][lightning_pref.losses.inversion_dpo.inversion_dpo_loss], the
       steps weighted by ``1 / (2 abar_t)``.

    Two targets (METHODS.md section 4, hazard (a)):

    * ``inverted_noise`` (default): Diffusion-DPO with the random ``x_t`` of ``q(x_t | x0)`` replaced by the
      inverted latent. Step ``i`` trains on ``x_t = z_{i+1}``, the latent at ``t_i``'s noise level, with the noise
      that makes it, ``eps = (z_{i+1} - sqrt(abar_{t_i}) x0) / sqrt(1 - abar_{t_i})``, as target; the reference's
      errors against it are not zero, so the gradient is not zero when the policy equals the reference. (At
      ``i = 0`` the identity step leaves ``z_1 = x0``, whose noise is ``0.015 x0`` on SD's schedule, at weight
      0.5.) ``[reconstructed]``: this library's answer to hazard (a), not the released code.
    * ``reference``: the released code. Step ``i`` trains on ``(z_i, t_i)``, where the reference predicted ``e_i``,
      with ``e_i`` as target: ``err_theta = |e_theta - e_ref|^2`` and ``err_ref = 0``. Its gradient is exactly zero
      while the policy equals the reference: a LoRA policy (``B = 0`` at the start) never moves, a full fine-tune
      only once AdamW's weight decay has moved it (the released code's 1e-2).

    ``sign`` (hazard (b)): ``dpo``, Diffusion-DPO's ``-log sigmoid(-(beta/2) D)``, or ``code``, the released code's
    ``-log sigmoid(+(beta/2) D)``, which with ``target="reference"`` rewards the policy for moving away from the
    reference on winners. ``code`` with ``inverted_noise`` would train towards the losers and is refused.

    Data: pair batches (latents, or pixels the VAE encodes with each pair's generator); the loser is inverted with
    the pair's caption, which is the winner's (``loser_inversion_prompt``). Defined for DDPM backbones (epsilon or
    v prediction: a v output is converted to the noise it stands for); flow-matching backbones are refused.

    Args:
        num_inversion_steps: ``N``, the inversion's DDIM steps (80 in the released script).
        guidance_scale: classifier-free guidance in the inversion and the predictions (2 in the released code; 1
            turns guidance off and halves every forward).
        timesteps_per_step: ``None``: every pair trains on all ``N`` steps (the released code); ``K``: on ``K``
            distinct steps drawn per pair from its stream, a cheaper unbiased estimate of ``D`` ``[reconstructed]``.
        target: ``inverted_noise`` (default) or ``reference`` (the released code); see above.
        sign: ``dpo`` (default) or ``code`` (the released code); see above.
        unconditional: the unguided branch's prompt conditioning: ``empty_prompt``, the backbone's encoding of
            ``""`` (as its sampler and caption dropout use), or ``zeros``, zero embeddings, as the released code
            (and SDXL's pipeline for an empty negative prompt) use.
        loser_inversion_prompt: ``caption`` (the pair's, i.e. the winner's, as the released code) or ``empty``
            (the loser inverted unconditioned; its predictions still see the caption) ``[reconstructed]``.
        inversion_cache_size: keep the inversions of this many samples (0: none) and reuse them while the sample,
            its conditioning and the reference are unchanged. It pays when samples recur unchanged: precomputed
            latents or a pixel-space model, several epochs, no random crop or flip. Each entry holds ``N`` latents
            on the CPU (``2 N`` with ``target="reference"``). A VAE samples a new latent each step, a replayed or
            self-play reference changes, and pairs made during training are new, so the cache only holds memory
            there; it is refused with a ``pair_source`` and for pixel batches a VAE encodes.
        inversion_cache_dir: also keep every inversion on disk, in a folder of this directory named by a hash of the
            reference's weights and the inversion's settings, and reuse it in any run that inverts the same sample
            with the same reference: the seeds of a sweep (concurrent processes may share the directory), a resumed
            or a repeated fit. The same entries as the memory cache, as safetensors files; with
            ``inversion_cache_size: 0`` only the disk is used. The reference's weights are hashed when training
            starts and whenever they change (seconds for an SDXL UNet). Refused where the memory cache is.
        **kwargs: the options of [`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule]
            (``beta`` defaults to 2000, the released SDXL script's ``beta_dpo``).
    """

    supported_prediction_types = ("epsilon", "v_prediction")

    def __init__(
        self,
        *args: Any,
        beta: float = 2000.0,
        num_inversion_steps: int = 80,
        guidance_scale: float = 2.0,
        timesteps_per_step: int | None = None,
        target: InversionTarget = "inverted_noise",
        sign: InversionSign = "dpo",
        unconditional: UnconditionalBranch = "empty_prompt",
        loser_inversion_prompt: LoserInversionPrompt = "caption",
        inversion_cache_size: int = 0,
        inversion_cache_dir: str | None = None,
        **kwargs: Any,
    ):
        check_inversion_sign(sign)
        check_whole_numbers(num_inversion_steps=num_inversion_steps)
        check_whole_numbers(0, inversion_cache_size=inversion_cache_size)
        if timesteps_per_step is not None:
            check_whole_numbers(timesteps_per_step=timesteps_per_step)
            if timesteps_per_step > num_inversion_steps:
                raise ConfigError(
                    f"timesteps_per_step={timesteps_per_step} exceeds num_inversion_steps={num_inversion_steps}: "
                    "use at most N, or null for all N."
                )
        if not guidance_scale >= 1.0:
            raise ConfigError(f"guidance_scale={guidance_scale}: use a value >= 1 (1 turns guidance off).")
        if target not in ("inverted_noise", "reference"):
            raise ConfigError(f"target={target!r}: choose 'inverted_noise' (the default) or 'reference'.")
        if target == "inverted_noise" and sign == "code":
            raise ConfigError(
                "sign='code' with target='inverted_noise' raises the winners' errors over the losers' (it trains "
                "towards the losers): use sign='dpo', or target='reference' for the released code's loss."
            )
        if unconditional not in ("empty_prompt", "zeros"):
            raise ConfigError(f"unconditional={unconditional!r}: choose 'empty_prompt' or 'zeros'.")
        if loser_inversion_prompt not in ("caption", "empty"):
            raise ConfigError(f"loser_inversion_prompt={loser_inversion_prompt!r}: choose 'caption' or 'empty'.")
        for option in ("loser_safeguard", "entropy_gamma"):
            if kwargs.get(option):
                raise ConfigError(
                    f"{option} is not defined for InversionDPO (its margin sums many steps per pair): remove it."
                )
        if (inversion_cache_size or inversion_cache_dir) and kwargs.get("pair_source") is not None:
            raise ConfigError(
                "inversion_cache_size and inversion_cache_dir cache the inversions of recurring samples, and a "
                "pair_source makes new pairs every step: set inversion_cache_size: 0 and inversion_cache_dir: null."
            )
        super().__init__(*args, beta=beta, **kwargs)
        self.inversion_timesteps = self.process.ddim_inversion_timesteps(num_inversion_steps)
        self.num_inversion_steps = num_inversion_steps
        self.guidance_scale = guidance_scale
        self.timesteps_per_step = timesteps_per_step
        self.target = target
        self.sign = sign
        self.unconditional = unconditional
        self.loser_inversion_prompt = loser_inversion_prompt
        #: a plain attribute: never in checkpoints, rebuilt on resume (from ``inversion_cache_dir`` if given)
        self.inversion_cache = (
            InversionCache(inversion_cache_size, inversion_cache_dir, self.inversion_settings())
            if inversion_cache_size or inversion_cache_dir
            else None
        )

    def inversion_settings(self) -> str:
        """What besides the reference's weights decides an inversion: the steps, guidance, unguided branch, stored
        points, prediction type and noise schedule (an ``inversion_cache_dir`` folder is named by their hash)."""
        schedule = hashlib.blake2b(self.process.alphas_cumprod.double().numpy().tobytes(), digest_size=8).hexdigest()
        return repr(
            (
                self.inversion_timesteps.tolist(),
                self.guidance_scale,
                self.unconditional,
                self.target,
                self.process.prediction_type,
                schedule,
            )
        )

    @property
    def steps_per_pair(self) -> int:
        """``K``: the inversion steps each pair trains on per optimizer step."""
        return self.timesteps_per_step or self.num_inversion_steps

    def on_train_start(self) -> None:
        if self.target == "reference" and self.global_step == 0:
            log.warning(
                "InversionDPO(target='reference') starts with the policy equal to the reference, where its gradient "
                "is exactly zero: a LoRA policy never moves, a full fine-tune only through weight decay. "
                "target='inverted_noise' has a gradient from the first step."
            )

    # ----------------------------------------------------------------------------------- the step
    def prepare_samples(self, batch: dict[str, Any], random: PairRandomness) -> Samples:
        """The base's samples; a cache is refused for pixels a VAE encodes, since it samples new latents each step."""
        media, vae = pair_media(batch), getattr(self.backbone, "vae", None)
        if self.inversion_cache is not None and media is not None and media[0] == PIXELS and vae is not None:
            raise ConfigError(
                "inversion_cache_size/inversion_cache_dir: the VAE samples a new latent of each image every step, so "
                "the cache never hits: precompute latents (`lightning-pref data precompute`) or set "
                "inversion_cache_size: 0 and inversion_cache_dir: null."
            )
        return super().prepare_samples(batch, random)

    def noise_samples(self, samples: Samples, random: PairRandomness) -> InvertedSamples:
        """Each pair's trained points of the reference's DDIM inversion of its winner and loser, and their targets."""
        x0, num_pairs, per_sample = samples.latents, samples.num_pairs, self.steps_per_pair
        steps = self.trained_steps(random).to(x0.device).repeat(2, 1)  # (2B, K): a winner and its loser share them
        per_step, cached_fraction = self.invert(
            x0, self.inversion_conditioning(samples.conditioning, num_pairs), int(steps.max()) + 1
        )
        timesteps = self.inversion_timesteps.to(x0.device)[steps].flatten()
        x_t = take_steps(per_step[0], steps)
        if self.target == "reference":  # the reference's e_i at (z_i, t_i)
            target = take_steps(per_step[1], steps)
        else:  # the noise that makes x_t = z_{i+1} of x0 at t_i
            target = self.process.noise_of(x_t, x0.repeat_interleave(per_sample, 0), timesteps)
        weight = self.process.error_weight(timesteps).to(x0.device)
        return InvertedSamples(x_t, target, target, timesteps, weight, cached_fraction)

    def sample_errors(self, noisy: NoisySamples, conditioning: Conditioning, batch: dict[str, Any]) -> SampleErrors:
        """Per-row errors in epsilon units: the policy's guided prediction (with grad) and, for
        ``target="inverted_noise"``, the reference's (no grad); the reference's are zero for ``target="reference"``,
        whose target is the reference's own prediction."""
        per_sample = self.steps_per_pair
        policy_rows = {
            name: value.repeat_interleave(per_sample, 0)
            for name, value in self.policy_conditioning(conditioning, batch).items()
        }
        policy_noise = self.guided_noise(self.denoiser, noisy.x_t, noisy.timesteps, policy_rows)
        squared = mean_squared_error(policy_noise, noisy.target)
        policy = squared * noisy.error_weight
        if self.target == "reference":
            reference = torch.zeros_like(policy)
        else:
            reference_rows = {
                name: value.repeat_interleave(per_sample, 0)
                for name, value in self.reference_conditioning(conditioning, batch).items()
            }
            with torch.no_grad(), self.reference_denoiser() as network:
                reference_noise = self.guided_noise(network, noisy.x_t, noisy.timesteps, reference_rows)
            reference = mean_squared_error(reference_noise, noisy.target) * noisy.error_weight
        return SampleErrors(policy, reference, squared.detach(), noisy, len(policy) // 2)

    def compute_loss(self, errors: SampleErrors, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        per_pair = [rows.view(-1, self.steps_per_pair) for rows in errors.as_args()]
        alphas_cumprod = self.process.alphas_cumprod[errors.timesteps.cpu()].view(-1, self.steps_per_pair)
        loss, metrics = inversion_dpo_loss(
            *per_pair, alphas_cumprod=alphas_cumprod.to(errors.policy.device), beta=self.beta, sign=self.sign
        )
        if errors.noisy.cached_fraction is not None:
            metrics["inversion_cached_fraction"] = torch.tensor(errors.noisy.cached_fraction)
        return loss, metrics

    # --------------------------------------------------------------------------------- the parts
    def trained_steps(self, random: PairRandomness) -> Tensor:
        """Which of the ``N`` inversion steps each pair trains on, ``(B, K)`` increasing indices: all ``N``, or
        ``timesteps_per_step`` distinct ones drawn from each pair's stream (the same for a pair whatever the batch,
        rank or resumption it is drawn in)."""
        every = self.num_inversion_steps
        if self.timesteps_per_step is None:
            return torch.arange(every).expand(len(random), every)
        return torch.stack(
            [torch.randperm(every, generator=g)[: self.timesteps_per_step].sort().values for g in random.generators]
        )

    def inversion_conditioning(self, conditioning: Conditioning, num_pairs: int) -> Conditioning:
        """The prompt conditioning each sample is inverted with: its pair's, or the empty prompt's for the losers
        with ``loser_inversion_prompt="empty"``."""
        if self.loser_inversion_prompt == "caption":
            return conditioning
        rows = next(iter(conditioning.values())).shape[0]
        return self.backbone.drop_prompts(conditioning, torch.arange(rows) >= num_pairs)

    def unconditional_conditioning(self, conditioning: Conditioning) -> Conditioning:
        """The unguided branch's conditioning: the empty prompt's encoding or zeros in every prompt tensor (other
        conditioning, e.g. SDXL's time ids, kept)."""
        rows = next(iter(conditioning.values())).shape[0]
        if self.unconditional == "empty_prompt":
            return self.backbone.drop_prompts(conditioning, torch.ones(rows, dtype=torch.bool))
        return {
            **conditioning,
            **{name: torch.zeros_like(conditioning[name]) for name in self.backbone.prompt_keys},
        }

    def guided_noise(self, network: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """``network``'s guided noise prediction ``e_u + g (e_c - e_u)`` at process times ``timesteps``, in fp32 and
        epsilon units whatever the backbone predicts; one forward over ``[unconditional; conditional]`` rows, in the
        network's dtype. Timesteps stay integers, so a bf16 network sees them exactly (the released code casts
        them to the UNet's dtype, which rounds some of N = 40's)."""
        dtype = parameter_dtype(network)
        model_t = self.process.model_timesteps(timesteps)
        if self.guidance_scale == 1.0:
            prediction = self.backbone.predict(network, x_t.to(dtype), model_t, conditioning_in(conditioning, dtype))
            return self.process.predicted_noise(prediction, x_t, timesteps)
        both = concat_conditioning([self.unconditional_conditioning(conditioning), conditioning])
        prediction = self.backbone.predict(
            network, torch.cat([x_t, x_t]).to(dtype), torch.cat([model_t, model_t]), conditioning_in(both, dtype)
        )
        unconditional, conditional = prediction.float().chunk(2)
        guided = unconditional + self.guidance_scale * (conditional - unconditional)
        return self.process.predicted_noise(guided, x_t, timesteps)

    def trained_points(self, inversion: DDIMInversion) -> tuple[Tensor, ...]:
        """What training needs of an inversion at each step ``i``, each ``(rows, n, ...)``: the point ``z_{i+1}``
        (``target="inverted_noise"``), or the point ``z_i`` and the reference's noise ``e_i`` (``"reference"``)."""
        if self.target == "reference":
            return inversion.latents[:, :-1], inversion.noise
        return (inversion.latents[:, 1:],)

    @torch.no_grad()
    def invert(self, x0: Tensor, conditioning: Conditioning, num_steps: int) -> tuple[tuple[Tensor, ...], float | None]:
        """The [`trained_points`][lightning_pref.methods.inversion_dpo.InversionDPO.trained_points] of the reference's
        DDIM inversion of every row of ``x0``, and the fraction of rows the cache served (``None`` without a cache).

        Without a cache the inversion stops after the ``num_steps`` steps the trained points need; with one, every
        missing row is inverted through all ``N`` steps and stored."""
        timesteps = self.inversion_timesteps.to(x0.device)
        if self.inversion_cache is None:
            timesteps = timesteps[:num_steps]
        policy_weights = {id(param) for param in self.denoiser.parameters() if param.requires_grad}
        with self.reference_denoiser() as network:

            def inverted(rows: Tensor | slice) -> tuple[Tensor, ...]:
                rows_conditioning = {name: value[rows] for name, value in conditioning.items()}
                inversion = ddim_invert(
                    lambda z, t: self.guided_noise(network, z, t, rows_conditioning),
                    x0[rows],
                    timesteps,
                    self.process.alphas_cumprod,
                )
                return self.trained_points(inversion)

            if self.inversion_cache is None:
                return inverted(slice(None)), None
            cache = self.inversion_cache
            cache.use_version(
                weights_version(network, exclude=policy_weights), lambda: frozen_tensors(network, policy_weights)
            )
            keys = cache.keys(x0, conditioning)
            entries = [cache.get(key) for key in keys]
            missing = [row for row, entry in enumerate(entries) if entry is None]
            if missing:
                rows = torch.tensor(missing, device=x0.device)
                fresh = inverted(rows) if cache.directory is None else in_fixed_chunks(inverted, rows)
                for index, row in enumerate(missing):
                    entries[row] = tuple(per_step[index] for per_step in fresh)
                    cache.put(keys[row], entries[row])
        per_step = tuple(
            torch.stack([entry[part].to(x0.device) for entry in entries]) for part in range(len(entries[0]))
        )
        return per_step, 1 - len(missing) / len(entries)


#: the rows an ``inversion_cache_dir`` inverts at once: a forward's rounding depends on its batch's size, so a fixed
#: size makes a stored inversion the same numbers whichever run, batch or process made it
INVERSION_CHUNK = 8


def in_fixed_chunks(invert: Callable[[Tensor], tuple[Tensor, ...]], rows: Tensor) -> tuple[Tensor, ...]:
    """``invert(rows)``, computed ``INVERSION_CHUNK`` rows at a time (the last chunk padded with its last row)."""
    padding = -len(rows) % INVERSION_CHUNK
    padded = torch.cat([rows, rows[-1:].expand(padding)])
    chunks = [invert(chunk) for chunk in padded.split(INVERSION_CHUNK)]
    return tuple(torch.cat(parts)[: len(rows)] for parts in zip(*chunks, strict=True))


def take_steps(per_step: Tensor, steps: Tensor) -> Tensor:
    """Rows ``per_step[r, steps[r, k]]`` of a ``(rows, n, ...)`` tensor, flattened to ``(rows * K, ...)``
    (row ``r * K + k``)."""
    rows = torch.arange(per_step.shape[0], device=per_step.device).unsqueeze(1).expand_as(steps)
    return per_step[rows, steps].flatten(0, 1)
