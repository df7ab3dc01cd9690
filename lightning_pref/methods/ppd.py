"""PPD: personalized preference fine-tuning (Dang et al., CVPR 2025, arXiv 2501.06655), METHODS.md section 6.

``[secondary]``: from summaries of the paper (no code was released); every guess is an option, named as such
below. The architecture is IP-Adapter's decoupled cross-attention
([`lightning_pref.adapters`][lightning_pref.adapters]).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from lightning_pref.adapters import (
    UserBranchOff,
    UserConditioned,
    add_user_branch,
    with_user,
    without_user,
)
from lightning_pref.backbones.base import Backbone, Conditioning
from lightning_pref.batch import USER_ID
from lightning_pref.errors import ConfigError, DataError, check_whole_numbers
from lightning_pref.generation import evaluating, generate
from lightning_pref.methods.base import PreferenceDiffusionModule
from lightning_pref.methods.diffusion_dpo import DiffusionDPO
from lightning_pref.seeding import PairRandomness
from lightning_pref.users import USER_EMBEDDING, UserTable, check_user_embeddings

#: options of the base module that choose how the UNet itself is fine-tuned: PPD keeps the UNet frozen
UNET_FINETUNE_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "reference_offload")


class PPD(DiffusionDPO):
    """PPD ``[secondary]``: Diffusion-DPO where the policy sees each pair's user and the reference does not.

    Per step, for ``B`` pairs of possibly many users:

    1. each pair's user embedding ``e_u`` (``user_tokens x user_dim``): the batch's precomputed
       ``user_embedding`` (a vision-language model read a few of the user's pairs; see
       [`lightning_pref.users`][lightning_pref.users]) or, with ``num_users``, a learned
       [`UserTable`][lightning_pref.users.UserTable] row for its ``user_id``; with probability ``user_dropout``
       replaced by a learned null embedding ``[reconstructed]``;
    2. the policy is the frozen UNet with a **decoupled cross-attention** beside every text cross-attention,
       ``Z' = Attn(Q, K_text, V_text) + Attn(Q, e_u W'_k, e_u W'_v)``
       ([`add_user_branch`][lightning_pref.adapters.add_user_branch]); ``W'_v`` starts at zero, so at step 0 the
       policy is the reference exactly;
    3. the reference is the same UNet without the user tokens: the base model
       ([`UserBranchOff`][lightning_pref.adapters.UserBranchOff]), no second copy;
    4. Diffusion-DPO's loss on the two ([`diffusion_dpo_loss`][lightning_pref.losses.diffusion_dpo_loss]).

    Only ``W'_k``, ``W'_v`` (one pair per cross-attention), the table and the null embedding train; LoRA and
    full fine-tuning of the UNet are off (``finetune`` is ``user_branch``, and the LoRA options and
    ``reference_offload`` are refused). Checkpoints hold these tensors only.

    Args:
        user_dim: the width of the user embedding (a VLM's hidden size for precomputed ones: 896 for
            LLaVA-OneVision-0.5B, 3584 for 7B).
        user_tokens: the tokens of one user embedding.
        num_users: learn one embedding per ``user_id`` ``0 .. num_users - 1`` instead of reading precomputed ones;
            ``None``: the batch's ``user_embedding``.
        user_dropout: probability of training a pair with the null embedding (0.1) ``[reconstructed]``: the null
            embedding learns the preference of the whole population, for users without examples.
        finetune: ``user_branch``, the only choice (see above).
        loss_type, label_smoothing: Diffusion-DPO's variants ([`DiffusionDPO`][lightning_pref.methods.DiffusionDPO]).
        **kwargs: the options of [`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule]
            (the paper: lr 1e-5, 768 pairs per optimizer step, one epoch; ``beta``: Diffusion-DPO's units, the
            summaries give no value, the default is Diffusion-DPO's 5000). ``entropy_gamma`` is refused.

    Sample for a user with ``generate(prompts, seeds, user_embedding=e_u)``; mix two users with
    [`interpolate_users`][lightning_pref.users.interpolate_users].
    """

    #: no LoRA, no full fine-tune: the new user branch trains (``build_reference``: the UNet without it)
    finetune_modes = ("user_branch",)

    def __init__(
        self,
        backbone: Backbone,
        *args: Any,
        user_dim: int,
        user_tokens: int = 16,
        num_users: int | None = None,
        user_dropout: float = 0.1,
        finetune: Literal["user_branch"] = "user_branch",
        **kwargs: Any,
    ):
        check_whole_numbers(user_dim=user_dim, user_tokens=user_tokens)
        if num_users is not None:
            check_whole_numbers(num_users=num_users)
        if not 0.0 <= user_dropout < 1.0:
            raise ConfigError(f"user_dropout={user_dropout}: use a probability in [0, 1).")
        base_defaults = inspect.signature(PreferenceDiffusionModule.__init__).parameters
        changed = [
            name
            for name in UNET_FINETUNE_OPTIONS
            if kwargs.get(name, base_defaults[name].default) != base_defaults[name].default
        ]
        if finetune != "user_branch" or changed:
            option = f"finetune={finetune!r}" if finetune != "user_branch" else f"{changed[0]}={kwargs[changed[0]]!r}"
            raise ConfigError(
                f"{option}: PPD trains only its user branch and keeps the UNet frozen (the UNet without the user "
                "tokens is the reference): remove the option."
            )
        if kwargs.get("entropy_gamma"):
            raise ConfigError("entropy_gamma (SEE-DPO's term) is not available with PPD yet: remove it.")
        super().__init__(backbone, *args, finetune=finetune, **kwargs)
        self.user_dim, self.user_tokens, self.user_dropout = user_dim, user_tokens, user_dropout
        with torch.random.fork_rng(devices=[]):  # the new weights depend on `seed` alone
            torch.manual_seed(self.seed)
            add_user_branch(self.denoiser, user_dim)
            self.user_table = UserTable(num_users, user_tokens, user_dim) if num_users is not None else None
        self.null_user = nn.Parameter(torch.zeros(user_tokens, user_dim)) if user_dropout > 0 else None

    def build_reference(self, adapter_config: None) -> UserBranchOff:
        """The UNet called without user tokens: the frozen base model, whatever the user branch holds."""
        return UserBranchOff(self.denoiser)

    def check_backbone(self, backbone: Backbone) -> None:
        if not isinstance(backbone.denoiser, UNet2DConditionModel):
            raise ConfigError(
                f"PPD puts its user branch beside the text cross-attentions of a UNet (SD1.5, SDXL), and "
                f"{type(backbone).__name__}'s denoiser is a {type(backbone.denoiser).__name__}: choose a UNet backbone."
            )
        super().check_backbone(backbone)

    # ------------------------------------------------------------------------------ the conditioning
    def prompt_conditioning(self, batch: dict[str, Any], random: PairRandomness) -> Conditioning:
        """The prompts' conditioning and each pair's user embedding (``user_embedding``), the null embedding in its
        place with probability ``user_dropout`` in training, drawn from the pair's stream."""
        conditioning = super().prompt_conditioning(batch, random)
        users = self.pair_users(batch)
        if self.null_user is not None and self.training:
            dropped = (random.uniform() < self.user_dropout).to(users.device)[:, None, None]
            users = torch.where(dropped, self.null_user.to(users.dtype), users)
        return {**conditioning, USER_EMBEDDING: users}

    def pair_users(self, batch: dict[str, Any]) -> Tensor:
        """``e_u`` of every pair, ``(B, user_tokens, user_dim)``: from the table by ``user_id``, or precomputed."""
        if self.user_table is not None:
            if USER_ID not in batch:
                raise DataError(
                    f"PPD with num_users looks each pair's user up by 'user_id', and the batch has {sorted(batch)}: "
                    "give every pair's json a user_id (UserPreferenceDataModule reads it)."
                )
            return self.user_table(torch.as_tensor(batch[USER_ID], device=self.device))
        if USER_EMBEDDING not in batch:
            raise DataError(
                f"PPD reads each pair's precomputed '{USER_EMBEDDING}', and the batch has {sorted(batch)}: write the "
                "embeddings into the shards (`lightning-pref data user-embeddings`) and read them with "
                "UserPreferenceDataModule, or set num_users to learn one embedding per user_id."
            )
        return check_user_embeddings(batch[USER_EMBEDDING], self.user_tokens, self.user_dim).to(self.device)

    def policy_conditioning(self, conditioning: Conditioning, batch: dict[str, Any]) -> Conditioning:
        """The policy sees the user tokens beside the text tokens."""
        return with_user(without_user(conditioning), conditioning[USER_EMBEDDING])

    def reference_conditioning(self, conditioning: Conditioning, batch: dict[str, Any]) -> Conditioning:
        """The reference sees the text alone."""
        return without_user(conditioning)

    # ---------------------------------------------------------------------------- users and samples
    def embedding_of(self, user_id: int) -> Tensor:
        """The learned embedding of a user of the table, ``(user_tokens, user_dim)`` (detached)."""
        if self.user_table is None:
            raise ConfigError(
                "this PPD reads precomputed embeddings (no num_users): embed a user with a UserEncoder instead."
            )
        return self.user_table(torch.tensor([user_id], device=self.device))[0].detach()

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        user_embedding: Tensor | None = None,
        source: Literal["policy", "reference"] = "policy",
        **settings: Any,
    ) -> Tensor:
        """Samples of ``prompts`` for the user ``user_embedding`` (``(user_tokens, user_dim)``, one user for every
        prompt, in both branches of classifier-free guidance). Without one: the base model (the user branch adds
        nothing without user tokens; ``module.null_user`` samples the population's preference). ``settings``:
        those of [`generation.generate`][lightning_pref.generation.generate]."""
        if user_embedding is None:
            return super().generate(prompts, seeds, source=source, **settings)
        if source != "policy":
            raise ConfigError(
                "a user embedding conditions the policy; the reference never sees one: use source='policy'."
            )
        check_user_embeddings(user_embedding[None], self.user_tokens, self.user_dim)
        with evaluating(self):
            return generate(
                self.backbone, prompts, seeds, denoiser=UserConditioned(self.denoiser, user_embedding), **settings
            )

    def trained_weights(self) -> dict[str, Tensor]:
        """The trained tensors (user branch, table, null embedding) as CPU copies, named as in this module's state
        dict (PPD's reference takes no snapshot, so no denoiser naming is needed)."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.named_parameters() if p.requires_grad}
