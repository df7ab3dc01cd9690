"""``lightning-pref data ...``: commands that write shards.

lightning-pref data pickapic --source pickapic_v2/data --out shards/pickapic [--ties drop|keep|coin_flip]
lightning-pref data pairs --table pairs.csv --out shards/mine [--root images/] [--label-column label]
lightning-pref data video-pairs --format videoalign --source train.csv --out shards/video [--label-column Overall]
lightning-pref data video-pairs --format videodpo --source vidpro-dpo/ --out shards/video
lightning-pref data precompute --backbone StableDiffusionBackbone --pretrained PATH --in shards/pickapic --out shards/latents
lightning-pref data relabel --in shards/pickapic --out shards/relabelled --scorer CLASS_PATH[=JSON] [--tie-margin 0.01]
lightning-pref data user-embeddings --in shards/pickapic --out shards/users --encoder VLM_HUB_ID_OR_DIR [--examples 4]
lightning-pref data toy --out data/toy --pairs 2048 [--label-noise 0.2] [--users warm cool]
lightning-pref data toy --users --out data/toy-users --pairs 2048   (PPD's two users: 0 warm, 1 cool)
lightning-pref data toy --real --out data/toy-real --pairs 1024
"""

from __future__ import annotations

import argparse
import json


def add_table_options(parser: argparse.ArgumentParser, label_column: str | None) -> None:
    """Options shared by the image and video pair-table converters."""
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument(
        "--root", default=None, help="directory the table's file paths are relative to (default: the table's)"
    )
    parser.add_argument("--prompt-column", default=None, help="column of the prompt (default: caption or prompt)")
    parser.add_argument("--winner-column", default="winner", help="column of the preferred file (ordered tables)")
    parser.add_argument("--loser-column", default="loser", help="column of the dispreferred file (ordered tables)")
    parser.add_argument("--first-column", default="path_A", help="column of the first file (labelled tables)")
    parser.add_argument("--second-column", default="path_B", help="column of the second file (labelled tables)")
    parser.add_argument(
        "--label-column", default=label_column, help="column holding A, B or same; unset: the table is ordered"
    )
    parser.add_argument(
        "--ties", default="drop", choices=["drop", "keep", "coin_flip"], help="what to do with 'same' rows"
    )
    parser.add_argument("--samples-per-shard", type=int, default=None, help="default: 1000 images or 100 videos")
    parser.add_argument("--seed", type=int, default=0, help="seeds the coin flips of --ties coin_flip")


def table_options(options: argparse.Namespace, media: str) -> dict:
    from lightning_pref.datamodules.pairs import PairColumns

    columns = PairColumns(
        options.prompt_column,
        options.winner_column,
        options.loser_column,
        options.first_column,
        options.second_column,
        options.label_column,
    )
    return dict(
        media=media, columns=columns, ties=options.ties, samples_per_shard=options.samples_per_shard, seed=options.seed
    )


def data_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lightning-pref data", description="Write preference shards.")
    commands = parser.add_subparsers(dest="command", required=True)

    pickapic = commands.add_parser("pickapic", help="Pick-a-Pic parquet files to preference shards (resumable)")
    pickapic.add_argument("--source", required=True, help="a directory of parquet files, one file, or a glob")
    pickapic.add_argument("--out", required=True, help="output directory for the shards")
    pickapic.add_argument(
        "--ties", default="drop", choices=["drop", "keep", "coin_flip"], help="what to do with tied pairs"
    )
    pickapic.add_argument("--shard-size-mb", type=float, default=1000, help="approximate size of one shard")
    pickapic.add_argument("--seed", type=int, default=0, help="seeds the coin flips of --ties coin_flip")

    pairs = commands.add_parser(
        "pairs", help="a folder of images plus a CSV/JSON/JSONL table of pairs to preference shards"
    )
    pairs.add_argument("--table", required=True, help="the table: winner/loser columns, or first/second/label columns")
    add_table_options(pairs, label_column=None)

    video = commands.add_parser(
        "video-pairs", help="video pairs (VideoAlign CSV, VideoDPO directory, or a table) to shards"
    )
    video.add_argument(
        "--format",
        default="videoalign",
        choices=["videoalign", "videodpo", "table"],
        help="videoalign: path_A,path_B,prompt,...,<label> CSV; videodpo: a directory with pair.json; "
        "table: like `data pairs`",
    )
    video.add_argument("--source", required=True, help="the CSV/JSON table, or the VideoDPO directory")
    add_table_options(video, label_column=None)

    precompute = commands.add_parser(
        "precompute", help="latents and prompt embeddings of shards, written to new shards"
    )
    precompute.add_argument(
        "--backbone",
        default="StableDiffusionBackbone",
        help="a backbone class name or path, or a fit config YAML (its model.init_args.backbone)",
    )
    precompute.add_argument("--pretrained", default=None, help="hub id or local pipeline directory")
    precompute.add_argument("--backbone-args", default="{}", help="other init arguments of the backbone, as JSON")
    precompute.add_argument(
        "--in", dest="source", required=True, help="pixel shards: a directory, glob or brace pattern"
    )
    precompute.add_argument("--out", required=True, help="output directory for the latent shards")
    precompute.add_argument(
        "--resolution", type=int, nargs="+", default=None, help="training size: one side, or height width"
    )
    precompute.add_argument("--num-frames", type=int, default=None, help="video frames per sample")
    precompute.add_argument("--frame-stride", type=int, default=1, help="take every n-th video frame")
    precompute.add_argument("--fps", type=float, default=None, help="resample videos to this frame rate instead")
    precompute.add_argument("--batch-size", type=int, default=16)
    precompute.add_argument(
        "--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="stored precision"
    )
    precompute.add_argument(
        "--format", default="safetensors", choices=["safetensors", "npy"], help="tensor file format"
    )
    precompute.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    relabel = commands.add_parser(
        "relabel", help="copy pair shards with each pair's winner chosen by a scorer (AI feedback) and a report"
    )
    relabel.add_argument("--in", dest="source", required=True, help="pair shards: a directory, glob or brace pattern")
    relabel.add_argument("--out", required=True, help="a new or empty directory for the shards and relabel.json")
    relabel.add_argument(
        "--scorer", required=True, help='a RewardModel: CLASS_PATH or CLASS_PATH={"json": "init args"}'
    )
    relabel.add_argument("--tie-margin", type=float, default=0.0, help="scores this close are a tie (default 0)")
    relabel.add_argument(
        "--ties", default="keep", choices=["keep", "drop"], help="a tie keeps its original order, or is dropped"
    )
    relabel.add_argument("--batch-size", type=int, default=32, help="pairs per scorer call")
    relabel.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    users = commands.add_parser(
        "user-embeddings",
        help="copy pair shards with each pair's user embedding added (a vision-language model reads a few pairs of "
        "each user), for PPD",
    )
    users.add_argument("--in", dest="source", required=True, help="pair shards: pixels or precomputed latents")
    users.add_argument("--out", required=True, help="output directory for the shards")
    users.add_argument(
        "--encoder",
        required=True,
        help="hub id or local directory of a vision-language model (the paper: LLaVA-OneVision)",
    )
    users.add_argument("--examples", type=int, default=4, help="pairs of each user the model reads (the paper: 4)")
    users.add_argument("--examples-from", default=None, help="pixel shards to read the examples from (default: --in)")
    users.add_argument("--tokens", type=int, default=16, help="final positions whose hidden states are the embedding")
    users.add_argument("--hidden-layer", type=int, default=None, help="which hidden states (default: the middle layer)")
    users.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"], help="model dtype")
    users.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    users.add_argument("--seed", type=int, default=0, help="seeds which pairs of each user are read")

    toy = commands.add_parser(
        "toy",
        help="sample the toy base model and label pairs with a programmatic reward (--real: rendered real winners)",
    )
    toy.add_argument("--out", required=True, help="output directory for the shards and info.json")
    toy.add_argument("--pairs", type=int, default=1024, help="candidate pairs to sample (near-ties are dropped)")
    toy.add_argument(
        "--users",
        nargs="*",
        default=["warm"],
        choices=["warm", "cool"],
        help="one preference per user (user i gets the i-th); the bare flag: PPD's two users, 0 warm and 1 cool",
    )
    toy.add_argument("--label-noise", type=float, default=0.0, help="fraction of pairs whose labels are flipped")
    toy.add_argument("--pipeline", default=None, help="pipeline to sample (default: the toy base model)")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument(
        "--real",
        action="store_true",
        help="write --pairs real winners instead (unpaired shards of rendered scenes in the first user's "
        "preferred colours), for SPIN-Diffusion and SSPO",
    )

    options = parser.parse_args(args)
    if options.command == "toy" and not options.users:
        from lightning_pref.toy.users import TWO_USERS

        options.users = list(TWO_USERS)
    if options.command == "pickapic":
        from lightning_pref.datamodules.pickapic import convert_pickapic

        counts = convert_pickapic(options.source, options.out, options.ties, options.shard_size_mb, options.seed)
    elif options.command == "pairs":
        from lightning_pref.datamodules.pairs import convert_pair_table

        counts = convert_pair_table(options.table, options.out, options.root, **table_options(options, "image"))
    elif options.command == "video-pairs":
        from lightning_pref.datamodules.pairs import convert_pair_table, convert_videodpo

        if options.format == "videodpo":
            counts = convert_videodpo(
                options.source, options.out, ties=options.ties, samples_per_shard=options.samples_per_shard
            )
        else:
            if options.format == "videoalign" and options.label_column is None:
                options.label_column = "Overall"
            counts = convert_pair_table(options.source, options.out, options.root, **table_options(options, "video"))
    elif options.command == "precompute":
        counts = run_precompute(options)
    elif options.command == "relabel":
        counts = run_relabel(options)
    elif options.command == "user-embeddings":
        counts = run_user_embeddings(options)
    elif options.real:
        from lightning_pref.toy.preferences import generate_toy_winners

        info = generate_toy_winners(options.out, options.pairs, preference=options.users[0], seed=options.seed)
        counts = info["counts"]
    else:
        from lightning_pref.toy.preferences import generate_toy_preferences

        info = generate_toy_preferences(
            options.out,
            options.pairs,
            pipeline=options.pipeline,
            users=options.users,
            label_noise=options.label_noise,
            seed=options.seed,
        )
        counts = info["counts"]
    print(json.dumps(counts))


def run_precompute(options: argparse.Namespace) -> dict:
    import torch

    from lightning_pref.datamodules.precompute import load_backbone, precompute_shards

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_backbone(options.backbone, options.pretrained, json.loads(options.backbone_args)).to(device).eval()
    resolution = options.resolution[0] if options.resolution and len(options.resolution) == 1 else options.resolution
    return precompute_shards(
        backbone,
        options.source,
        options.out,
        resolution=resolution,
        num_frames=options.num_frames,
        frame_stride=options.frame_stride,
        fps=options.fps,
        batch_size=options.batch_size,
        dtype=options.dtype,
        file_format=options.format,
    )


def run_relabel(options: argparse.Namespace) -> dict:
    import torch

    from lightning_pref.evaluation import ScorerSpec
    from lightning_pref.relabel import relabel_shards

    report = relabel_shards(
        options.source,
        options.out,
        ScorerSpec.parse(options.scorer),
        tie_margin=options.tie_margin,
        ties=options.ties,
        batch_size=options.batch_size,
        device=options.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        progress=True,
    )
    return {**report["counts"], "flip_fraction": report["flip_fraction"]}


def run_user_embeddings(options: argparse.Namespace) -> dict:
    import torch

    from lightning_pref.datamodules.users import write_user_embeddings
    from lightning_pref.users import VisionLanguageUserEncoder

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = VisionLanguageUserEncoder(
        options.encoder, hidden_layer=options.hidden_layer, tokens=options.tokens, dtype=options.dtype, device=device
    )
    return write_user_embeddings(
        options.source,
        options.out,
        encoder,
        examples_per_user=options.examples,
        examples_from=options.examples_from,
        seed=options.seed,
    )
