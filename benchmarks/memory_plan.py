"""The memory-plan tables of ``docs/guides/memory-plan.md``, from ``lightning_pref.plan``.

Writes, between the page's markers:

1. ``memory-plan:grid``: per-GPU memory of DPO for CogVideoX-5B, Wan2.1-1.3B and Wan2.1-14B on 1, 8 and 16
   (8 x 2 nodes) GPUs, LoRA and full fine-tuning, every strategy, one pair per GPU;
2. ``memory-plan:published``: the SFT rows of the same planner (no reference, batch not doubled) next to the
   figures CogVideoX publishes for its own fine-tuning (THUDM/CogVideo, ``finetune/README.md``, "Hardware
   Requirements": 49x480x720, batch 1, LoRA rank 128, gradient checkpointing), with the ratio, and the DPO
   figure of the same configuration.

Nothing runs on a GPU: every model is built on the meta device.

    python benchmarks/memory_plan.py [--page docs/guides/memory-plan.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_pref.plan import FINETUNES, PRESETS, STRATEGIES, gib, markdown_table, plan_memory

PAGE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "memory-plan.md"
GRID_MODELS = ("cogvideox-5b", "wan2.1-1.3b", "wan2.1-14b")
GRID_LAYOUTS = ((1, 1), (8, 1), (8, 2))  # (GPUs per node, nodes)
# (model, finetune, strategy, GPUs per node, published GB per GPU); "sft" there is full fine-tuning.
PUBLISHED = (
    ("cogvideox-2b", "lora", "ddp", 1, 16),
    ("cogvideox-5b", "lora", "ddp", 1, 24),
    ("cogvideox-2b", "full", "ddp", 1, 36),
    ("cogvideox-2b", "full", "zero2_offload", 1, 17),
    ("cogvideox-2b", "full", "zero2", 8, 17),
    ("cogvideox-2b", "full", "zero3", 8, 19),
    ("cogvideox-2b", "full", "zero3_offload", 8, 14),
    ("cogvideox-5b", "full", "zero2_offload", 1, 42),
    ("cogvideox-5b", "full", "zero2", 8, 42),
    ("cogvideox-5b", "full", "zero3", 8, 43),
    ("cogvideox-5b", "full", "zero3_offload", 8, 28),
)
COMMAND = "python benchmarks/memory_plan.py"


def grid_table() -> str:
    plans = [
        plan_memory(model, PRESETS[model], finetune, strategy, gpus, nodes)
        for model in GRID_MODELS
        for finetune in FINETUNES
        for gpus, nodes in GRID_LAYOUTS
        for strategy in STRATEGIES
    ]
    return markdown_table(plans)


def published_table() -> str:
    lines = [
        "| model | finetune | strategy | GPUs | published SFT (GB) | ours SFT (GiB) | ours / published "
        "| ours DPO (GiB) | DPO / SFT |",
        "|---|---|---|---|--:|--:|--:|--:|--:|",
    ]
    for model, finetune, strategy, gpus, published in PUBLISHED:
        sft, dpo = (
            plan_memory(model, PRESETS[model], finetune, strategy, gpus, 1, objective) for objective in ("sft", "dpo")
        )
        lines.append(
            f"| {model} | {finetune} | {strategy} | {gpus} | {published} | {gib(sft.gpu)} "
            f"| {sft.gpu / 2**30 / published:.2f} | {gib(dpo.gpu)} | {dpo.gpu / sft.gpu:.2f} |"
        )
    return "\n".join(lines)


def write_between(page: Path, name: str, markdown: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``page``."""
    text = page.read_text()
    start_marker, end_marker = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    start, end = text.index(start_marker) + len(start_marker), text.index(end_marker)
    page.write_text(text[:start] + "\n" + markdown + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--page", type=Path, default=PAGE, help="the markdown page holding the markers")
    options = parser.parse_args()
    tables = {"memory-plan:grid": grid_table(), "memory-plan:published": published_table()}
    for name, markdown in tables.items():
        print(markdown, end="\n\n")
        write_between(options.page, name, f"Command: `{COMMAND}`\n\n{markdown}")


if __name__ == "__main__":
    main()
