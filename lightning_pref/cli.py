"""The ``lightning-pref`` command: LightningCLI (``fit``, ``validate``) plus ``data``, ``plan``, ``export``,
``plot``, ``evaluate`` and ``sample``.

    lightning-pref fit --config examples/quickstart.yaml
    lightning-pref fit --config x.yaml --model.init_args.beta 2000 --trainer.max_steps 100
    lightning-pref fit --config x.yaml --ckpt_path run/checkpoints/last.ckpt      # resume with this config
    lightning-pref fit --print_config
    lightning-pref data toy --out data/toy
    lightning-pref export --config run/config.yaml --checkpoint run/checkpoints/last.ckpt --out tuned
    lightning-pref plot outputs/quickstart
    lightning-pref evaluate --tuned run/checkpoints/last.ckpt --config run/config.yaml --prompts prompts.txt
        --scorer lightning_pref.rewards.toy.WarmthReward --out eval.json
    lightning-pref sample --model tuned-model --prompts prompts.txt --seeds-per-prompt 4 --out samples

An error the user can fix ([`lightning_pref.errors`][lightning_pref.errors]) is printed as one line naming the key, file or
field and the fix, with exit status 2; ``LIGHTNING_PREF_DEBUG=1`` shows its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

import lightning_pref.callbacks  # noqa: F401  (registers short class names for configs)
import lightning_pref.datamodules  # noqa: F401
import lightning_pref.methods  # noqa: F401
from lightning_pref.errors import UserError
from lightning_pref.methods.base import PreferenceDiffusionModule

USAGE = """usage: lightning-pref COMMAND [options]

commands:
  fit        train a method from a YAML config (LightningCLI: --config, --print_config, --ckpt_path)
  validate   evaluate a config (and a checkpoint) on its validation shards
  data       write preference shards: pickapic, pairs, video-pairs, precompute, relabel, user-embeddings, toy
  plan       per-GPU memory of a preference run, before renting the GPUs
  export     a training checkpoint to a diffusers model or LoRA
  plot       training curves of a run's metrics.csv to a PNG
  evaluate   rewards of a tuned model against its base on a prompt file, under a pinned spec, to JSON
  sample     images (PNGs and a grid) of a model for a prompt file

`lightning-pref COMMAND --help` describes each command.
"""


def quiet_libraries() -> None:
    """Silence per-file loading progress bars of transformers and diffusers."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


class PreferenceCLI(LightningCLI):
    """LightningCLI in subclass mode: ``model`` and ``data`` are chosen by ``class_path``, including classes
    defined in a user's own module (``class_path: my_package.MyMethod``).

    With ``--ckpt_path`` the run uses the config it is given: LightningCLI's default would silently replace the
    model's options by the checkpoint's hyper-parameters. The module compares the two when it loads the
    checkpoint ([`on_load_checkpoint`][lightning_pref.methods.base.PreferenceDiffusionModule.on_load_checkpoint]).
    """

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

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate``: a preference module defines no test or predict step."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--trust_pickled_checkpoint",
            type=bool,
            default=False,
            help="with --ckpt_path: unpickle every part of the checkpoint (only for checkpoints you wrote yourself); "
            "by default anything beyond plain tensors and numbers is refused",
        )

    def _parse_ckpt_path(self) -> None:
        """Keep the given config (see the class docstring); refuse, before anything runs, a checkpoint whose
        pickled parts hold more than plain data ([`check_readable`][lightning_pref.checkpoints.check_readable])."""
        from lightning_pref.checkpoints import check_readable

        subcommand = self.config.get("subcommand")
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            trusted = self.config[subcommand].get("trust_pickled_checkpoint", False)
            check_readable(Path(ckpt_path), trust_pickle=trusted, opt_in="--trust_pickled_checkpoint true")

    def before_fit(self) -> None:
        self.trust_strategy()

    def before_validate(self) -> None:
        self.trust_strategy()

    def trust_strategy(self) -> None:
        """``--trust_pickled_checkpoint true`` also lets the strategy's own checkpoint loading unpickle."""
        if self.config[self.subcommand].get("trust_pickled_checkpoint") and hasattr(
            self.trainer.strategy, "trust_pickled_checkpoint"
        ):
            self.trainer.strategy.trust_pickled_checkpoint = True


def user_error_in(error: BaseException) -> UserError | None:
    """The user error behind ``error``: itself, or one in its chain of causes (jsonargparse wraps the errors
    of a class's ``__init__`` in its own ``ValueError``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def run(args: list[str] | None) -> None:
    """Dispatch a command; ``None`` reads the command line (LightningCLI parses ``sys.argv`` itself)."""
    words = sys.argv[1:] if args is None else args
    if not words or words[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    if words[0] == "data":
        from lightning_pref.data_commands import data_main

        data_main(words[1:])
    elif words[0] == "plan":
        from lightning_pref.plan import plan_main

        plan_main(words[1:])
    elif words[0] == "export":
        from lightning_pref.export import export_main

        export_main(words[1:])
    elif words[0] == "plot":
        from lightning_pref.plotting import plot_main

        plot_main(words[1:])
    elif words[0] == "evaluate":
        from lightning_pref.evaluation import evaluate_main

        evaluate_main(words[1:])
    elif words[0] == "sample":
        from lightning_pref.evaluation import sample_main

        sample_main(words[1:])
    else:
        PreferenceCLI(args=args)


def main(args: list[str] | None = None) -> None:
    """Entry point; ``args`` defaults to the command line."""
    quiet_libraries()
    try:
        run(None if args is None else list(args))
    except Exception as error:
        found = user_error_in(error)
        if found is None or os.environ.get("LIGHTNING_PREF_DEBUG"):
            raise
        print(f"lightning-pref: error: {' '.join(str(found).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
