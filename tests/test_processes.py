import pytest
import torch
from diffusers import DDPMScheduler

from lightning_pref.processes import DDPMProcess, FlowMatchingProcess


def scheduler(prediction_type="epsilon"):
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_matches_diffusers(prediction_type):
    reference = scheduler(prediction_type)
    process = DDPMProcess(reference.config)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(process.add_noise(x0, noise, t), reference.add_noise(x0, noise, t))
    expected = noise if prediction_type == "epsilon" else reference.get_velocity(x0, noise, t)
    torch.testing.assert_close(process.target(x0, noise, t), expected)
    assert process.prediction_type == prediction_type


def test_timestep_range_restricts_draws():
    process = DDPMProcess(scheduler().config, timestep_range=(0.2, 0.3))
    t = process.sample_timesteps(10_000, torch.Generator().manual_seed(0))
    assert t.min() >= 200 and t.max() < 300
    assert len(t.unique()) == 100


def test_min_snr_weight():
    process = DDPMProcess(scheduler().config, error_weighting="min_snr", min_snr_gamma=5.0)
    t = torch.tensor([0, 999])
    weights = process.error_weight(t)
    assert weights[0].item() == pytest.approx(5.0 / process.snr(t)[0].item())  # high SNR is clipped
    assert weights[1].item() == pytest.approx(1.0)  # low SNR keeps weight 1


def test_flow_matching_interpolates_and_targets_velocity():
    process = FlowMatchingProcess()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    s = torch.tensor([0.0, 0.25, 1.0])
    x_t = process.add_noise(x0, noise, s)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], noise[2])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(process.target(x0, noise, s), noise - x0)
    torch.testing.assert_close(process.model_timesteps(s), s * 1000)


def test_flow_shift_and_weights():
    shifted = FlowMatchingProcess(shift=3.0, error_weighting="eps_equivalent")
    s = shifted.sample_timesteps(1000, torch.Generator().manual_seed(0))
    plain = FlowMatchingProcess().sample_timesteps(1000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(s, 3 * plain / (1 + 2 * plain))
    torch.testing.assert_close(shifted.error_weight(torch.tensor([0.5])), torch.tensor([0.25]))


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="timestep_range"):
        DDPMProcess(scheduler().config, timestep_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        DDPMProcess(scheduler("sample").config)
    with pytest.raises(ValueError, match="time_sampling"):
        FlowMatchingProcess(time_sampling="cosine")


@pytest.mark.parametrize(
    "process",
    [
        DDPMProcess(DDPMScheduler().config),
        DDPMProcess(DDPMScheduler().config, timestep_range=(0.2, 0.6)),
        FlowMatchingProcess(),
        FlowMatchingProcess(shift=3.0, time_sampling="logit_normal", logit_mean=0.5),
    ],
    ids=["ddpm", "ddpm-range", "flow", "flow-logit-normal-shifted"],
)
def test_timesteps_at_uniform_quantiles_follow_the_sampling_distribution(process):
    """timesteps_at is the inverse CDF of sample_timesteps: the two agree in distribution (two-sample KS)."""
    drawn = process.sample_timesteps(20_000, torch.Generator().manual_seed(0)).double()
    at_quantiles = process.timesteps_at(torch.rand(20_000, generator=torch.Generator().manual_seed(1))).double()
    grid = torch.linspace(float(drawn.min()), float(drawn.max()), 200)
    cdf = lambda values: (values[:, None] <= grid[None, :]).double().mean(0)  # noqa: E731
    assert (cdf(drawn) - cdf(at_quantiles)).abs().max() < 1.63 * (2 / 20_000) ** 0.5  # KS at the 1% level


def test_stratified_timesteps_cover_every_stratum_and_agree_across_ranks():
    from lightning_pref.seeding import PairRandomness

    process = DDPMProcess(DDPMScheduler().config)
    whole = PairRandomness.for_pairs(("s",), range(8), total=8).timesteps(process, stratified=True)
    assert sorted((whole // 125).tolist()) == list(range(8))  # one timestep in each eighth of [0, 1000)
    halves = [
        PairRandomness.for_pairs(("s",), range(r * 4, r * 4 + 4), total=8).timesteps(process, stratified=True)
        for r in (0, 1)
    ]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)  # two ranks of 4 pairs draw what one of 8 does
