"""The ``lightning-pref`` command: LightningCLI (fit, validate, ...) plus ``data``, ``plan`` and ``export``.

    lightning-pref fit --config examples/quickstart.yaml
    lightning-pref fit --config x.yaml --model.init_args.beta 2000 --trainer.max_steps 100
    lightning-pref fit --print_config
    lightning-pref data toy --out data/toy
    lightning-pref export --config run/config.yaml --checkpoint run/checkpoints/last.ckpt --out tuned
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

import lightning_pref.callbacks  # noqa: F401  (registers short class names for configs)
import lightning_pref.datamodules  # noqa: F401
import lightning_pref.methods  # noqa: F401
from lightning_pref.methods.base import PreferenceDiffusionModule


def quiet_libraries() -> None:
    """Silence per-file loading progress bars of transformers and diffusers."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


class PreferenceCLI(LightningCLI):
    """LightningCLI in subclass mode: ``model`` and ``data`` are chosen by ``class_path``, including classes
    defined in a user's own module (``class_path: my_package.MyMethod``)."""

    def __init__(self, args: list[str] | None = None, **kwargs):
        super().__init__(
            PreferenceDiffusionModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the module's own optimizer options (scale_lr, warm-up) apply
            args=args,
            **kwargs,
        )


def main(args: list[str] | None = None) -> None:
    """Entry point; ``args`` defaults to the command line."""
    quiet_libraries()
    words = sys.argv[1:] if args is None else list(args)
    if words and words[0] == "data":
        from lightning_pref.data_commands import data_main

        data_main(words[1:])
        return
    if words and words[0] == "plan":
        from lightning_pref.plan import plan_main

        plan_main(words[1:])
        return
    if words and words[0] == "export":
        from lightning_pref.export import export_main

        export_main(words[1:])
        return
    PreferenceCLI(args=args)


if __name__ == "__main__":
    main()
