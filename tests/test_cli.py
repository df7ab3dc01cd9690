"""The `lightning-pref` command: configs, overrides, user subclasses, and errors a user can make."""

import pytest
import yaml
from helpers.cli import REPO, run_cli, tiny_config, write_config


def test_print_config_works_without_a_config(tmp_path):
    result = run_cli(["fit", "--print_config"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model: null" in result.stdout and "trainer:" in result.stdout


def test_fit_from_yaml_with_a_command_line_override(tiny_sd, tiny_shards, tmp_path):
    config = write_config(tiny_config(tiny_sd, tiny_shards, tmp_path), tmp_path)
    result = run_cli(
        ["fit", "--config", str(config), "--model.init_args.finetune", "full", "--trainer.max_steps", "3"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = next(tmp_path.glob("lightning_logs/version_*/metrics.csv")).read_text().splitlines()
    assert "train/implicit_acc" in metrics[0]
    assert len(metrics) == 1 + 3  # header + one row per step
    saved = yaml.safe_load(next(tmp_path.glob("lightning_logs/version_*/config.yaml")).read_text())
    assert saved["model"]["init_args"]["finetune"] == "full"


def test_a_user_subclass_named_by_class_path_trains(tiny_sd, tiny_shards, tmp_path):
    config = tiny_config(tiny_sd, tiny_shards, tmp_path)
    config["model"]["class_path"] = "custom_method.MarginWeightedDPO"
    config["model"]["init_args"]["temperature"] = 0.5
    result = run_cli(["fit", "--config", str(write_config(config, tmp_path))], tmp_path, extra_path=REPO / "examples")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_steps=2` reached" in result.stderr + result.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.init_args.betta", "10"], "betta"),
        (["--model.init_args.finetune", "qlora"], "finetune"),
    ],
)
def test_unknown_or_invalid_options_name_the_key(tiny_sd, tiny_shards, tmp_path, override, message):
    config = write_config(tiny_config(tiny_sd, tiny_shards, tmp_path), tmp_path)
    result = run_cli(["fit", "--config", str(config), *override], tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
