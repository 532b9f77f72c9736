"""The training objectives: the flow objective's loss and ODE samplers against the closed-form
Gaussian case, min-SNR weighting, the objective record, and the refusal of samplers that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dit_core.diffusion import (
    SAMPLERS_BY_OBJECTIVE,
    FlowMatching,
    check_sampler,
    create_diffusion,
    flow_times,
    make_objective,
    make_sampler,
    sample_loop,
    training_losses,
)
from dit_core.models import DiT, DiTConfig
from dit_core.pipeline import ImagePipeline, SamplingSettings

# Gaussian data x_0 ~ N(MU, S^2). On the path x_t = (1 - t) x_0 + t eps, x_t ~ N((1 - t) MU, V_t) with
# V_t = (1 - t)^2 S^2 + t^2, and the optimal velocity is E[eps - x_0 | x_t] =
# (t - (1 - t) S^2) (x_t - (1 - t) MU) / V_t - MU.
MU, S = 0.4, 0.5
FLOW = {"objective": "flow", "learn_sigma": False}


def optimal_velocity(time_scale: float = 1000.0):
    def fn(x, t_model):
        t = (t_model.double() / time_scale).view(-1, 1, 1, 1)
        v_t = (1 - t) ** 2 * S**2 + t**2
        return ((t - (1 - t) * S**2) * (x.double() - (1 - t) * MU) / v_t - MU).float()
    return fn


@pytest.mark.parametrize("sampler,steps,rel_tol", [("euler", 200, 0.03), ("heun", 20, 0.02), ("dpm-solver++", 10, 0.03)])
def test_flow_samplers_reproduce_gaussian_data(sampler, steps, rel_tol):
    """With the exact velocity every flow sampler returns the data's mean and variance (measured
    bias: Euler -5.8% at 50 steps, -1.5% at 200; Heun -3.6% at 10 steps; DPM-Solver++ -1.3% at 10)."""
    s = make_objective(FLOW).sampler(sampler, steps)
    noise = torch.randn(8000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = sample_loop(s, optimal_velocity(), noise)
    assert x.mean().item() == pytest.approx(MU, abs=0.015), "mean"
    assert x.var().item() == pytest.approx(S**2, rel=rel_tol), "variance"


def test_second_order_flow_samplers_beat_euler_at_equal_evaluations():
    noise = torch.randn(8000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    flow = make_objective(FLOW)
    exact = sample_loop(flow.sampler("heun", 200), optimal_velocity(), noise)   # the ODE's own end point
    err = {}
    for name, steps in (("euler", 9), ("heun", 5), ("dpm-solver++", 9)):
        s = flow.sampler(name, steps)
        assert s.num_evaluations == 9
        err[name] = (sample_loop(s, optimal_velocity(), noise) - exact).abs().mean().item()
    # measured: Euler 0.061, Heun 0.033, DPM-Solver++ 0.0069 (mean absolute distance to the ODE's end point)
    assert err["heun"] < err["euler"] / 1.5 and err["dpm-solver++"] < err["euler"] / 5, err


def test_flow_dpm_solver_first_step_is_euler():
    flow = make_objective(FLOW)
    x = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    v = torch.randn_like(x)
    dpm, euler = flow.sampler("dpm-solver++", 6), flow.sampler("euler", 6)
    dpm.reset()
    torch.testing.assert_close(dpm.step(0, x, v, None), euler.step(0, x, v, None))


def test_flow_times_and_model_timesteps():
    t = flow_times(4)
    np.testing.assert_allclose(t, [1, 0.75, 0.5, 0.25, 0])
    shifted = flow_times(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > t[1:-1]).all()   # more steps at high noise
    s = make_objective(FLOW).sampler("euler", 4)
    np.testing.assert_allclose(s.model_timesteps, [1000, 750, 500, 250])   # t * time_scale, as floats
    assert s.model_timesteps.dtype == np.float32


def test_flow_loss_is_zero_for_the_true_velocity_and_sees_scaled_time():
    flow = FlowMatching(time_scale=1000.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    t = torch.rand(6, generator=g)
    seen = {}

    def model_fn(x_t, tt):
        seen["t"], seen["x_t"] = tt, x_t
        return noise - x0

    terms = flow.losses(model_fn, x0, t, noise)
    assert terms["loss"].abs().max() < 1e-10
    torch.testing.assert_close(seen["t"], t * 1000)
    torch.testing.assert_close(seen["x_t"], (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise)
    wrong = flow.losses(lambda x_t, tt: torch.zeros_like(x0), x0, t, noise)["loss"]
    torch.testing.assert_close(wrong, ((noise - x0) ** 2).mean(dim=(1, 2, 3)))


def test_logit_normal_times_concentrate_in_the_middle():
    torch.manual_seed(0)
    ln = FlowMatching(timestep_sampling="logit-normal").sample_t(20000, "cpu")
    un = FlowMatching(timestep_sampling="uniform").sample_t(20000, "cpu")
    assert 0 < ln.min() and ln.max() < 1
    middle = lambda t: ((t > 0.25) & (t < 0.75)).float().mean().item()  # noqa: E731
    assert middle(ln) == pytest.approx(0.728, abs=0.02)   # P(|N(0,1)| < logit(0.75) = 1.0986)
    assert middle(un) == pytest.approx(0.5, abs=0.02)


def test_paper_objective_is_the_paper_loss_and_old_records_read_as_eps():
    """The eps objective's default loss is training_losses bit for bit, and a record written
    before ``objective`` existed builds the same samplers."""
    obj = make_objective({"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True})
    assert obj.name == "eps" and obj.settings()["objective"] == "eps"
    model = DiT(DiTConfig(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=3))
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(5, 4, 4, 4, generator=g), torch.tensor([0, 1, 2, 0, 1])
    t = torch.randint(0, 1000, (5,), generator=g)
    torch.manual_seed(3)
    ours = obj.losses(lambda x, tt: model(x, tt, y), x0, t)["loss"]
    torch.manual_seed(3)
    ref = training_losses(create_diffusion(), lambda x, tt: model(x, tt, y), x0, t)["loss"]
    assert torch.equal(ours, ref)
    np.testing.assert_array_equal(obj.sampler("ddim", 10).model_timesteps,
                                  make_sampler("ddim", create_diffusion(), 10).model_timesteps)


def test_min_snr_weights_only_the_noiseless_end():
    obj = make_objective({"loss_weighting": "min-snr", "min_snr_gamma": 5.0})
    abar = obj.diffusion.alphas_cumprod
    snr = abar / (1 - abar)
    w = obj._snr_weight
    assert (w <= 1).all() and np.allclose(w[snr <= 5], 1) and (w[snr > 5] < 1).all()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 2, 2, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    out = lambda x, tt: torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1)  # noqa: E731
    torch.manual_seed(0)
    weighted = obj.losses(out, x0, t)
    torch.manual_seed(0)
    plain = make_objective({}).losses(out, x0, t)
    torch.testing.assert_close(weighted["loss"] - weighted["vb"], torch.as_tensor(w[[0, 10, 500, 999]]).float() * plain["mse"])


@pytest.mark.parametrize("record,sampler", [(FLOW, "ddpm"), (FLOW, "ddim"), ({}, "euler"), ({"objective": "eps"}, "heun")])
def test_a_sampler_that_does_not_fit_the_objective_is_refused(record, sampler):
    with pytest.raises(ValueError, match="does not fit this model") as err:
        check_sampler(record, sampler)
    assert all(name in str(err.value) for name in SAMPLERS_BY_OBJECTIVE[make_objective(record).name])
    with pytest.raises(ValueError, match="does not fit"):
        make_objective(record).sampler(sampler, 4)


@pytest.mark.parametrize("record,match", [
    ({"objective": "flow", "learn_sigma": True}, "learn_sigma: false"),
    ({"objective": "eps", "timestep_sampling": "logit-normal"}, "timestep_sampling"),
    ({"objective": "flow", "loss_weighting": "min-snr"}, "loss_weighting"),
    ({"objective": "velocity"}, "objective 'velocity' is unknown"),
])
def test_inconsistent_objective_settings_are_refused(record, match):
    with pytest.raises(ValueError, match=match):
        make_objective(record)


class _Identity:
    """Latents are the images (3 channels): the pipeline without an autoencoder."""

    downsample = 1

    def to(self, device):
        return self

    def decode(self, z):
        return z.clamp(-1, 1)


def test_pipeline_samples_a_flow_model_and_refuses_an_eps_sampler():
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                          in_channels=3, learn_sigma=False))
    pipe = ImagePipeline(model, _Identity(), 1.0, make_objective(FLOW).settings(), device="cpu")
    for name in SAMPLERS_BY_OBJECTIVE["flow"]:
        images = pipe.generate([0, 2], [1, 2], SamplingSettings(sampler=name, num_steps=3))
        assert images.shape == (2, 4, 4, 3) and images.dtype == np.uint8
    again = pipe.generate([0], [1], SamplingSettings(sampler="heun", num_steps=3))
    np.testing.assert_array_equal(again[0], pipe.generate([0, 2], [1, 2], SamplingSettings(sampler="heun", num_steps=3))[0])
    with pytest.raises(ValueError, match="objective 'flow'"):
        pipe.generate([0], [1], SamplingSettings(sampler="ddpm", num_steps=3))
