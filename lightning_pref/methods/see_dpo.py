"""SEE-DPO: Diffusion-DPO with a self-entropy bonus, which flattens the reference.

Shekhar, Singh, Zhang, TMLR 2025, arXiv 2411.04712 ``[secondary]`` ``[reconstructed]``, METHODS.md section 7.
"""

from __future__ import annotations

from typing import Any

from lightning_pref.errors import ConfigError
from lightning_pref.methods.diffusion_dpo import DiffusionDPO


class SEEDPO(DiffusionDPO):
    """SEE-DPO ``[secondary]`` ``[reconstructed]``: maximise ``E[r] - beta KL(p || p_ref) + gamma H(p)``.

    In Diffusion-DPO form the margin becomes ``u_SEE = -(1/2) [(beta + gamma) D_theta - beta D_ref]
    = u - (gamma/2) D_theta``: the optimum is the reference flattened by ``beta / (beta + gamma)``, tilted by
    the reward. The regulariser itself is the base module's ``entropy_gamma`` option, so it also applies to
    any other pairwise method (e.g. ``DMPO(..., entropy_gamma=...)``); this class is Diffusion-DPO with it on.

    Args:
        entropy_gamma: ``gamma``, in beta's units (500 = 0.1 x the default beta; sweep ``gamma / beta`` in
            0.05..0.5 to start). Must be positive: with 0 this is
            [`DiffusionDPO`][lightning_pref.methods.diffusion_dpo.DiffusionDPO].
        **kwargs: the options of [`DiffusionDPO`][lightning_pref.methods.diffusion_dpo.DiffusionDPO] (``loss_type``,
            ``label_smoothing``, ``beta``, ...).
    """

    def __init__(self, *args: Any, entropy_gamma: float = 500.0, **kwargs: Any):
        if entropy_gamma <= 0:
            raise ConfigError(
                f"entropy_gamma={entropy_gamma}: SEEDPO needs gamma > 0 (with 0 it is DiffusionDPO); "
                "try gamma / beta in 0.05..0.5."
            )
        super().__init__(*args, entropy_gamma=entropy_gamma, **kwargs)
