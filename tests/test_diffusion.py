"""Diffusion: schedules, noising, losses, respacing; samplers against the closed-form Gaussian case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dit_core.diffusion import (
    GaussianDiffusion,
    create_diffusion,
    make_betas,
    make_sampler,
    randn,
    sample_loop,
    space_timesteps,
    training_losses,
)
from dit_core.models import DiT, DiTConfig
from dit_core.pipeline import make_model_fn

# Gaussian data x_0 ~ N(MU, S^2), elementwise. Then x_t ~ N(sqrt(abar) MU, abar S^2 + 1 - abar) and
# the optimal epsilon-predictor is E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar S^2 + 1 - abar).
MU, S = 0.4, 0.5


def optimal_eps_model(base: GaussianDiffusion, learned_sigma: bool, sampling: GaussianDiffusion | None = None):
    """The optimal network for Gaussian data. With ``sampling`` (a respaced diffusion), its variance
    output v is optimal too: the true reverse variance is beta~_t + coef1_t^2 Var[x_0 | x_t], and
    v in [-1, 1] interpolates log beta~_t .. log beta_t of that diffusion. Otherwise v = -1 (beta~_t)."""
    abar_all = torch.tensor(base.alphas_cumprod, dtype=torch.float64)
    v_of_t = torch.full((base.num_timesteps,), -1.0, dtype=torch.float64)
    if sampling is not None:
        abar = sampling.alphas_cumprod
        var_x0 = S**2 * (1 - abar) / (abar * S**2 + 1 - abar)
        true_var = sampling.posterior_variance + sampling.posterior_mean_coef1**2 * var_x0
        lo, hi = sampling.posterior_log_variance_clipped, np.log(sampling.betas)
        frac = (np.log(np.maximum(true_var, 1e-20)) - lo) / np.where(hi > lo, hi - lo, 1.0)
        v_of_t[torch.as_tensor(sampling.timestep_map)] = torch.as_tensor(2 * np.clip(frac, 0, 1) - 1)

    def fn(x, t):
        abar = abar_all[t].float().view(-1, 1, 1, 1)
        eps = torch.sqrt(1 - abar) * (x - torch.sqrt(abar) * MU) / (abar * S**2 + 1 - abar)
        if learned_sigma:
            return torch.cat([eps, v_of_t[t].float().view(-1, 1, 1, 1).expand_as(eps)], dim=1)
        return eps

    return fn


def test_linear_schedule_matches_the_paper():
    b = make_betas("linear", 1000)
    assert b.shape == (1000,) and b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    c = make_betas("cosine", 1000)
    assert c.shape == (1000,) and (np.diff(np.cumprod(1 - c)) < 0).all() and c.max() <= 0.999
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        make_betas("quadratic", 1000)


def test_q_sample_has_the_marginal_moments():
    d = create_diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(20000, 1, 2, 2, generator=g)
    t = torch.full((20000,), 300)
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    abar = d.alphas_cumprod[300]
    assert xt.mean().item() == pytest.approx(np.sqrt(abar) * MU, abs=0.01)
    assert xt.var().item() == pytest.approx(abar * S**2 + 1 - abar, rel=0.02)


def test_space_timesteps():
    assert space_timesteps(1000, 1000) == list(range(1000))
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert len(space_timesteps(1000, "10,15,20")) == 45
    with pytest.raises(ValueError):
        space_timesteps(1000, 1001)


def test_respaced_keeps_the_marginals():
    base, spaced = create_diffusion(), create_diffusion("50")
    kept = spaced.timestep_map
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)


def test_respaced_ddpm_with_all_steps_equals_unspaced():
    base = create_diffusion(learn_sigma=True)
    full = create_diffusion("1000", learn_sigma=True)
    np.testing.assert_allclose(full.betas, base.betas, rtol=1e-10)
    fn = optimal_eps_model(base, learned_sigma=True)
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    a = sample_loop(make_sampler("ddpm", base, 1000), fn, noise, torch.Generator().manual_seed(2))
    # A plain, unspaced ancestral loop written out against base's own coefficients.
    g = torch.Generator().manual_seed(2)
    x = noise.clone()
    for i in reversed(range(1000)):
        t = torch.full((8,), i)
        out = base.p_mean_variance(fn(x, t), x, t)
        x = out["mean"] + (torch.exp(0.5 * out["log_variance"]) * torch.randn(x.shape, generator=g) if i > 0 else 0)
    torch.testing.assert_close(a, x, rtol=1e-5, atol=1e-5)


# Tolerance on the variance: the sampling error of 32,000 values (std ~0.8%) plus each method's
# discretisation bias, measured here: DDIM (first order) -11% at 50 steps, -5.5% at 100, -2.2% at
# 250; DPM-Solver++(2M) +3% at 10 and 20 steps; DDPM-250 with the optimal learned variance -0.5%.
@pytest.mark.parametrize(
    "sampler,steps,eta,rel_tol",
    [
        ("ddpm", 250, 0.0, 0.03),
        ("ddim", 250, 0.0, 0.04),
        ("ddim", 250, 1.0, 0.06),
        ("dpm-solver++", 20, 0.0, 0.05),
        ("dpm-solver++", 10, 0.0, 0.05),
    ],
)
def test_samplers_reproduce_gaussian_data(sampler, steps, eta, rel_tol):
    """With the optimal denoiser, every sampler must return the data's mean and variance."""
    base = create_diffusion(learn_sigma=True)
    s = make_sampler(sampler, base, steps, eta=eta)
    fn = optimal_eps_model(base, learned_sigma=True, sampling=getattr(s, "diffusion", None))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8000, 1, 2, 2, generator=g)
    x = sample_loop(s, fn, noise, g)
    assert x.mean().item() == pytest.approx(MU, abs=0.015), "mean"
    assert x.var().item() == pytest.approx(S**2, rel=rel_tol), "variance"


def test_more_steps_shrink_the_discretisation_error():
    base = create_diffusion(learn_sigma=True)
    fn = optimal_eps_model(base, learned_sigma=True)
    noise = torch.randn(8000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for name, few, many in [("ddim", 20, 250), ("dpm-solver++", 5, 50)]:
        err = [abs(sample_loop(make_sampler(name, base, n), fn, noise).var().item() - S**2) for n in (few, many)]
        assert err[1] < err[0] / 3, (name, err)


def test_samplers_are_deterministic_for_a_fixed_generator():
    model = DiT(DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10))
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.1)
    base = create_diffusion(learn_sigma=True)
    y = torch.tensor([1, 2, 3])
    fn = make_model_fn(model.eval(), y, guidance_scale=2.0)
    for name, steps in [("ddpm", 20), ("ddim", 10), ("dpm-solver++", 5)]:
        runs = []
        for _ in range(2):
            g = torch.Generator().manual_seed(7)
            noise = randn((3, 4, 8, 8), g)
            runs.append(sample_loop(make_sampler(name, base, steps, eta=0.5), fn, noise, g))
        assert torch.equal(runs[0], runs[1]), name
        assert torch.isfinite(runs[0]).all()


def test_per_sample_generators_make_images_independent_of_the_batch():
    base = create_diffusion(learn_sigma=True)
    fn = optimal_eps_model(base, learned_sigma=True)
    sampler = make_sampler("ddpm", base, 25)

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sample_loop(sampler, fn, randn((len(seeds), 1, 2, 2), gens), gens)

    together = run([11, 12, 13])
    alone = run([12])
    torch.testing.assert_close(together[1:2], alone)


def test_guidance_scale_must_be_non_negative():
    from dit_core.pipeline import SamplingSettings

    with pytest.raises(ValueError, match="guidance_scale=-1"):   # checked once, where it enters: the settings
        SamplingSettings(guidance_scale=-1.0)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_sampler("euler", create_diffusion(), 10)


@pytest.mark.parametrize("bad, match", [
    ({"sampler": "lms"}, "sampler 'lms' is unknown"),
    ({"num_steps": 0}, "num_steps=0 must be at least 1"),
    ({"eta": -0.5}, "eta=-0.5 must be >= 0"),
    ({"guided_channels": 0}, "guided_channels=0 must be at least 1"),
    ({"cache_interval": 0}, "cache_interval=0 must be at least 1"),
])
def test_sampling_settings_are_checked_when_made(bad, match):
    from dit_core.pipeline import SamplingSettings

    with pytest.raises(ValueError, match=match):
        SamplingSettings(**bad)


def test_hybrid_loss_terms():
    d = create_diffusion(learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 100, 500, 999])
    noise = torch.randn(x0.shape, generator=g)
    out = torch.zeros(6, 8, 8, 8, requires_grad=True)
    terms = training_losses(d, lambda x, tt: out * 1.0, x0, t, noise)
    assert set(terms) == {"loss", "mse", "vb"}
    torch.testing.assert_close(terms["mse"], noise.square().mean(dim=(1, 2, 3)))
    assert (terms["vb"][1:] >= 0).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # The bound does not train the mean: its gradient reaches only the variance channels.
    terms["vb"].sum().backward()
    assert out.grad[:, :4].abs().sum() == 0 and out.grad[:, 4:].abs().sum() > 0

    fixed = create_diffusion(learn_sigma=False)
    terms = training_losses(fixed, lambda x, tt: torch.zeros_like(x), x0, t, noise)
    assert set(terms) == {"loss", "mse"}


def test_vb_term_is_zero_for_the_true_posterior():
    # With the true epsilon and the posterior variance (v = -1), p equals q: the KL vanishes.
    d = create_diffusion(learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([5, 50, 500, 999])
    terms = training_losses(d, lambda x, tt: torch.cat([noise, -torch.ones_like(noise)], 1), x0, t, noise)
    assert terms["vb"].abs().max() < 1e-3
    assert terms["mse"].abs().max() < 1e-10


def test_tiny_dit_overfits_one_fixed_batch():
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10))
    d = create_diffusion(learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 8, 8, generator=g)
    t = torch.randint(1, 1000, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    model.y_embedder.dropout_prob = 0.0  # a fixed batch: no label dropout
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    losses = []
    for _ in range(300):
        loss = training_losses(d, lambda x, tt: model(x, tt, y), x0, t, noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
