"""Video preference pairs: PyAV decoding, one frame window for both videos, layout, skipped short videos."""

import numpy as np
import pytest

from lightning_pref.datamodules import VideoPreferenceDataModule, write_preference_shards
from lightning_pref.datamodules.media import FrameSampling, SkipSample, encode_video

STEP = 12  # frame i is uniformly grey with value STEP * i (+ an offset telling the videos apart)


def video(num_frames, fps=8, offset=0, size=32):
    return encode_video(
        np.stack([np.full((size, size, 3), STEP * i + offset, np.uint8) for i in range(num_frames)]), fps
    )


def frame_indices(clip, offset=0):
    """Frame index of every frame of a ``(C, F, H, W)`` clip in [-1, 1], read back from its grey level."""
    grey = (clip.mean(dim=(0, 2, 3)) + 1) * 127.5
    return [round((value - offset) / STEP) for value in grey.tolist()]


def write_pairs(path, pairs):
    records = []
    for i, (winner, loser) in enumerate(pairs):
        (path / f"w{i}.mp4").write_bytes(winner)
        (path / f"l{i}.mp4").write_bytes(loser)
        records.append({"winner": path / f"w{i}.mp4", "loser": path / f"l{i}.mp4", "caption": f"clip {i}"})
    write_preference_shards(records, path / "shards")
    return str(path / "shards")


def test_stride_window_is_shared_by_both_videos_and_batches_are_bcfhw(tmp_path):
    shards = write_pairs(tmp_path, [(video(12), video(16, offset=6))] * 3)  # the loser is longer
    data = VideoPreferenceDataModule(
        shards,
        num_frames=4,
        frame_stride=2,
        random_temporal_crop=True,
        resolution=(16, 24),
        batch_size=3,
        num_workers=0,
        batches_per_epoch=4,
    )
    starts = set()
    for batch in data.train_dataloader():
        assert batch["pixels_w"].shape == batch["pixels_l"].shape == (3, 3, 4, 16, 24)
        for winner, loser in zip(batch["pixels_w"], batch["pixels_l"]):
            indices = frame_indices(winner)
            assert indices == frame_indices(loser, offset=6)  # the same window in both videos
            assert np.diff(indices).tolist() == [2, 2, 2] and indices[-1] < 12  # inside the shorter video
            starts.add(indices[0])
    assert len(starts) > 1  # random temporal crops
    val = VideoPreferenceDataModule(
        shards, val_shards=shards, num_frames=4, frame_stride=2, random_temporal_crop=True, num_workers=0
    )
    assert frame_indices(next(iter(val.val_dataloader()))["pixels_w"][0]) == [0, 2, 4, 6]  # validation: from the start


def test_fps_resampling_takes_the_same_times_from_videos_of_different_rates(tmp_path):
    shards = write_pairs(tmp_path, [(video(16, fps=8), video(20, fps=16, offset=6))])  # 2 s and 1.25 s
    data = VideoPreferenceDataModule(shards, val_shards=shards, num_frames=5, fps=4, num_workers=0)
    batch = next(iter(data.val_dataloader()))
    assert frame_indices(batch["pixels_w"][0]) == [0, 2, 4, 6, 8]  # t = 0, 0.25, ..., 1 s at 8 fps
    assert frame_indices(batch["pixels_l"][0], offset=6) == [0, 4, 8, 12, 16]  # the same times at 16 fps


def test_short_and_corrupt_videos_are_skipped_and_counted(tmp_path, caplog):
    shards = write_pairs(
        tmp_path, [(video(8), video(8)), (video(3), video(8)), (video(8), b"not a video"), (video(8), video(8))]
    )
    data = VideoPreferenceDataModule(shards, val_shards=shards, num_frames=4, batch_size=4, num_workers=0)
    batches = list(data.val_dataloader())
    assert [batch["prompt"] for batch in batches] == [["clip 0", "clip 3"]]
    assert data.skipped_samples == 2
    reasons = " ".join(record.message for record in caplog.records)
    assert "video has 3 frames; 4 frames at stride 1 need 4" in reasons and "loser.mp4 does not decode" in reasons


def test_frame_sampling_options_are_checked():
    with pytest.raises(ValueError, match="not both"):
        FrameSampling(4, frame_stride=2, fps=8)
    with pytest.raises(SkipSample, match="lasts 0.50 s"):
        FrameSampling(4, fps=2).indices([[0.0, 0.25, 0.5]], np.random.default_rng(0))


def test_videos_in_an_image_datamodule_name_the_fix(tmp_path, caplog):
    from lightning_pref.datamodules import PreferenceDataModule

    shards = write_pairs(tmp_path, [(video(4), video(4))])
    data = PreferenceDataModule(shards, val_shards=shards, num_workers=0)
    assert list(data.val_dataloader()) == [] and data.skipped_samples == 1
    assert "use VideoPreferenceDataModule or set num_frames" in caplog.text
