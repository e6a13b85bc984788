"""Samplers driven by the exact denoiser of Gaussian data.

For pixels x0 ~ N(mu, s^2) the ideal predictions are known in closed form (a = alpha_bar_t):
    eps*(x_t) = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a),
    x0*(x_t) = (x_t - sqrt(1 - a) eps*) / sqrt(a),  v* = sqrt(a) eps* - sqrt(1 - a) x0*.
Each step is then affine in x_t, so the law of the chain's output is Gaussian with a mean and
variance we compute exactly by recursion. Two tolerances follow:
  1. the sampled mean/std equal that exact law within 5 standard errors (N = 8,192 independent
     pixels: SE(mean) = sd / sqrt(N) ~ 0.0055, SE(std) ~ sd / sqrt(2N) ~ 0.004) -> tests the loop;
  2. the exact law approaches (mu, s) as S -> T: at S = 1000 every rule is within 1.5% of s and the
     mean within 0.005 of mu (x_T ~ N(0, I) ignores the sqrt(alpha_bar_T) mu left at t = T, largest
     for the quadratic schedule); at S = 250 within 3.5% -> tests the step rules' coefficients. At 10 or
     50 steps the rules are biased by design (the DDIM paper's Table 1); the numbers are asserted
     against the exact law only.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.diffusion.process import GaussianProcess
from benchmarks.golden_diffusers import CASES, SHAPE, setup
from ddpm.diffusion.samplers import SPACINGS, STEP_RULES, StepRule, sample_images, sample_loop, timestep_grid
from ddpm.diffusion.schedules import get_beta_schedule

MU, S = 0.2, 0.5
T = 1000
RULES = [StepRule("ddpm"), StepRule("ddpm_large"), StepRule("ddim", 0.0), StepRule("ddim", 0.5), StepRule("ddim", 1.0),
         StepRule("dpmpp_2m"), StepRule("dpmpp_2m_sde")]
STEPS = [10, 50, 250]  # S = T is covered by the exact law below and by test_grids


class GaussianOracle(torch.nn.Module):
    """The exact predictor of an objective for N(MU, S^2) data; knows alpha_bar only to be an oracle."""

    def __init__(self, alpha_bar: torch.Tensor, objective: str):
        super().__init__()
        self.register_buffer("ab", alpha_bar.float())
        self.objective = objective
        self.channels = 1

    def forward(self, x, t):
        a = self.ab[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)
        x0 = MU + a.sqrt() * S**2 * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)  # finite at alpha_bar = 0
        return {"pred_noise": eps, "pred_x0": x0, "pred_v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.objective]


def exact_law(alpha_bar: list[float], rule: StepRule, steps: int) -> tuple[float, float]:
    """Mean and std of the sampler's output for the Gaussian oracle, by exact affine recursion on the
    pair (x, x0_hist): multistep rules also use the previous step's x0 prediction."""
    grid = rule.grid(len(alpha_bar), steps)
    alpha_bar = rule.alpha_bars(alpha_bar)
    m, C = np.zeros(2), np.diag([1.0, 0.0])
    ab_hist = None
    for i, t in enumerate(grid):
        last = i == len(grid) - 1
        a, ap = alpha_bar[t], (1.0 if last else alpha_bar[grid[i + 1]])
        c = rule.coefficients(a, ap, last, ab_hist)
        d = a * S**2 + 1 - a
        ae, be = math.sqrt(1 - a) / d, -math.sqrt(1 - a) * math.sqrt(a) * MU / d  # eps* = ae x + be
        a0, b0 = math.sqrt(a) * S**2 / d, MU - a * S**2 * MU / d  # x0* = a0 x + b0, finite at alpha_bar = 0
        M = np.array([[c.x0 * a0 + c.xt + c.eps * ae, c.hist], [a0, 0.0]])  # (x, x0_hist) -> next pair
        m = M @ m + np.array([c.x0 * b0 + c.eps * be, b0])
        C = M @ C @ M.T + np.diag([c.sigma**2, 0.0])
        ab_hist = a if rule.multistep else None
    return float(m[0]), math.sqrt(C[0, 0])


@pytest.fixture(scope="module")
def process():
    return {obj: GaussianProcess(get_beta_schedule("linear", T), obj) for obj in ("pred_noise", "pred_x0", "pred_v")}


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.label)
def test_samples_follow_the_exact_law(process, objective, rule):
    p = process[objective]
    model = GaussianOracle(p.alpha_bar64, objective)
    ab = p.alpha_bar64.tolist()
    for steps in STEPS[:2] if rule.multistep else STEPS:  # 250 steps: covered by the exact law below
        g = torch.Generator().manual_seed(steps)
        x = sample_loop(model, p, (2048, 1, 2, 2), steps, rule, g, clip_denoised=False)
        n = x.numel()
        m, sd = exact_law(ab, rule, steps)
        assert abs(x.mean().item() - m) < 5 * sd / math.sqrt(n), (steps, x.mean().item(), m)
        assert abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * n), (steps, x.std().item(), sd)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid", "quadratic"])
def test_exact_law_converges_to_the_data(schedule):
    ab = torch.cumprod(1 - get_beta_schedule(schedule, T), 0).tolist()
    for rule in RULES:
        for steps, tol in ((250, 0.035), (1000, 0.015)):
            if rule.multistep and steps == T:  # the solvers' linspace takes S + 1 points: S = T repeats one
                rule = StepRule(rule.name, 0.0, "trailing")
            m, sd = exact_law(ab, rule, steps)
            assert abs(m - MU) < 5e-3, (rule, steps, m)
            assert abs(sd / S - 1) < tol, (rule, steps, sd)


def test_ddim_eta0_is_deterministic_and_eta1_equals_ddpm():
    p = GaussianProcess(get_beta_schedule("cosine", 100))
    model = GaussianOracle(p.alpha_bar64, "pred_noise")
    xT = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sample_loop(model, p, xT.shape, 20, StepRule("ddim", 0.0), torch.Generator().manual_seed(1), x_T=xT)
    b = sample_loop(model, p, xT.shape, 20, StepRule("ddim", 0.0), torch.Generator().manual_seed(2), x_T=xT)
    assert torch.equal(a, b)
    c = sample_loop(model, p, xT.shape, 20, StepRule("ddim", 1.0), torch.Generator().manual_seed(3), x_T=xT)
    d = sample_loop(model, p, xT.shape, 20, StepRule("ddpm"), torch.Generator().manual_seed(3), x_T=xT)
    torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-5)  # DDIM eta=1 is the DDPM posterior (DDIM Sec. 4.1)


def test_step_rule_against_stored_values():
    # one DDPM step from alpha_bar 0.5 to 0.8 (beta = 0.375): hand-derived from Ho et al. eq. 7
    c = StepRule("ddpm").coefficients(0.5, 0.8, last=False)
    expected = (math.sqrt(0.8) * 0.375 / 0.5, math.sqrt(0.625) * 0.2 / 0.5, 0, 0)
    assert (c.x0, c.xt, c.eps, c.hist) == pytest.approx(expected)
    assert c.sigma == pytest.approx(math.sqrt(0.375 * 0.2 / 0.5))
    assert StepRule("ddpm_large").coefficients(0.5, 0.8, False).sigma == pytest.approx(math.sqrt(0.375))
    c = StepRule("ddim", 0.0).coefficients(0.5, 0.8, False)
    assert tuple(c) == pytest.approx((math.sqrt(0.8), 0.0, math.sqrt(0.2), 0.0, 0.0))
    assert tuple(StepRule("ddpm").coefficients(0.5, 1.0, last=True)) == pytest.approx((1.0, 0.0, 0.0, 0.0, 0.0))
    # DPM-Solver++ first order is DDIM (eta = 0) written in x0 and x_t (Lu et al. 2022b, Sec. 4.1)
    c = StepRule("dpmpp_2m").coefficients(0.5, 0.8, False, None)
    assert c.x0 + c.xt * math.sqrt(0.5) == pytest.approx(math.sqrt(0.8)) and c.xt == pytest.approx(math.sqrt(0.2 / 0.5))
    # second order: x0 weights 1 + 1/(2r) and -1/(2r), r = h_hist / h; equal lambda steps give r = 1
    lam = lambda ab: 0.5 * math.log(ab / (1 - ab))  # noqa: E731
    ab_hist = 1 / (1 + math.exp(-2 * (2 * lam(0.5) - lam(0.8))))  # lambda_hist = 2 lambda_s - lambda_t
    c2 = StepRule("dpmpp_2m").coefficients(0.5, 0.8, False, ab_hist)
    assert (c2.x0, c2.hist, c2.xt) == pytest.approx((1.5 * c.x0, -0.5 * c.x0, c.xt))
    assert tuple(StepRule("dpmpp_2m_sde").coefficients(0.5, 1.0, True, 0.3)) == (1.0, 0.0, 0.0, 0.0, 0.0)


def test_dpmpp_beats_ddim_at_few_steps_on_the_exact_law():
    """A second-order solver of the probability-flow ODE is closer to the data law than DDIM (first order)."""
    ab = torch.cumprod(1 - get_beta_schedule("linear", T), 0).tolist()
    for steps in (5, 10, 20):
        errs = {}
        for rule in (StepRule("ddim", 0.0), StepRule("dpmpp_2m")):
            m, sd = exact_law(ab, rule, steps)
            errs[rule.name] = abs(m - MU) + abs(sd - S)
        assert errs["dpmpp_2m"] < errs["ddim"], (steps, errs)


def test_grids_and_bad_rules():
    assert timestep_grid(1000, 1000) == list(range(999, -1, -1))
    assert timestep_grid(1000, 10)[0] == 999 and timestep_grid(1000, 10)[-1] == 0
    assert len(set(timestep_grid(100, 99))) == 99
    assert timestep_grid(50, 1) == [49]
    assert timestep_grid(1000, 1000, "trailing", solver=True) == list(range(999, -1, -1))
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=r"sampling steps must be an integer in \[1, timesteps=1000\]"):
            timestep_grid(1000, bad)
    with pytest.raises(ValueError, match="steps=1000 with spacing 'linspace' gives repeated timesteps"):
        timestep_grid(1000, 1000, "linspace", solver=True)
    with pytest.raises(ValueError, match="unknown timestep spacing 'uniform'; allowed: linspace, trailing, leading"):
        timestep_grid(1000, 10, "uniform")
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        StepRule("euler")
    with pytest.raises(ValueError, match="eta must be in"):
        StepRule("ddim", 1.5)
    with pytest.raises(ValueError, match="sampler dpmpp_2m takes no eta, got eta=0.5; allowed: 0.0"):
        StepRule("dpmpp_2m", 0.5)
    with pytest.raises(ValueError, match="unknown timestep spacing 'even'"):
        StepRule("ddim", 0.0, "even")
    assert set(STEP_RULES) == {"ddpm", "ddpm_large", "ddim", "dpmpp_2m", "dpmpp_2m_sde"}


def test_every_rule_uses_the_chosen_grid():
    """The model sees exactly the rule's grid, once per step, for every spacing."""
    p = GaussianProcess(get_beta_schedule("linear", 100))
    for name in STEP_RULES:
        for spacing in SPACINGS:
            seen = []
            model = lambda x, t: seen.append(int(t[0])) or torch.zeros_like(x)  # noqa: E731
            rule = StepRule(name, 0.0, spacing)
            sample_loop(model, p, (2, 1, 2, 2), 7, rule, torch.Generator().manual_seed(0))
            assert seen == rule.grid(100, 7) == timestep_grid(100, 7, spacing, solver=rule.multistep)
    assert timestep_grid(100, 7, "trailing") != timestep_grid(100, 7, "leading") != timestep_grid(100, 7)


def test_zero_terminal_snr_solver_starts_finite():
    """At alpha_bar_T = 0 lambda is -inf; the solvers step from 2**-24 there, as diffusers does."""
    p = GaussianProcess(get_beta_schedule("linear", T, zero_terminal_snr=True), "pred_v")
    assert p.alpha_bar64[-1] == 0
    rule = StepRule("dpmpp_2m", 0.0, "trailing")
    assert rule.alpha_bars(p.alpha_bar64.tolist())[-1] == 2.0**-24
    assert StepRule("ddim").alpha_bars(p.alpha_bar64.tolist())[-1] == 0.0
    model = GaussianOracle(p.alpha_bar64, "pred_v")
    x = sample_loop(model, p, (512, 1, 2, 2), 10, rule, torch.Generator().manual_seed(0), clip_denoised=False)
    assert torch.isfinite(x).all()
    m, sd = exact_law(p.alpha_bar64.tolist(), rule, 10)
    n = x.numel()
    assert abs(x.mean().item() - m) < 5 * sd / math.sqrt(n) and abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * n)
    sd_ddim = exact_law(p.alpha_bar64.tolist(), StepRule("ddim", 0.0, "trailing"), 10)[1]
    assert abs(sd - S) < abs(sd_ddim - S)  # and the solver is closer to the data than DDIM there too


# --- golden values from diffusers 0.42.1 (benchmarks/golden_diffusers.py writes them) ---------------
GOLDEN = np.load(Path(__file__).parent / "data" / "golden_diffusers.npz")
GOLDEN_TOL = 1e-5


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['name']}-{c['rule']}-{c['objective']}-{c['spacing']}"
                         f"-{c['steps']}{'-clip' if c['clip'] else ''}{'-ztsnr' if c['ztsnr'] else ''}")
def test_matches_diffusers(case):
    """Same betas, toy model, x_T and generator: our loop matches DPMSolverMultistepScheduler
    (dpmsolver++ / sde-dpmsolver++, solver_order=2, lower_order_final=True) and DDIMScheduler."""
    process, model, rule, x_T, seed = setup(case)
    ours = sample_loop(model, process, SHAPE, case["steps"], rule, torch.Generator().manual_seed(seed),
                       case["clip"], x_T=x_T)
    np.testing.assert_allclose(ours.numpy(), GOLDEN[case["name"]], rtol=0, atol=GOLDEN_TOL)


def test_grids_match_diffusers_timestep_spacing():
    keys = [k for k in GOLDEN.files if k.startswith("grid-")]
    assert len(keys) >= 100
    for key in keys:
        _, kind, spacing, total, steps = key.split("-")
        ours = timestep_grid(int(total), int(steps), spacing, solver=kind == "dpm")
        if kind == "ddim" and steps == "1" and spacing != "trailing":
            assert ours == [int(total) - 1] and list(GOLDEN[key]) == [0]  # ours starts from the noisiest step
        else:
            assert ours == GOLDEN[key].tolist(), key


def test_clipping_keeps_x0_in_range_and_chunks_are_order_free():
    p = GaussianProcess(get_beta_schedule("linear", 50))
    wild = lambda x, t: 10 * torch.ones_like(x)  # noqa: E731  predicts x0 far below -1
    out = sample_loop(wild, p, (4, 1, 2, 2), 5, StepRule("ddim"), torch.Generator().manual_seed(0), clip_denoised=True)
    assert out.min().item() >= -1.0 and out.max().item() <= 1.0
    model = GaussianOracle(p.alpha_bar64, "pred_noise")
    full = sample_images(model, p, 10, (1, 2, 2), 5, StepRule("ddpm"), seed=3, batch_size=4)
    part = sample_images(model, p, 10, (1, 2, 2), 5, StepRule("ddpm"), seed=3, batch_size=4, chunks=[2, 1])
    assert full.shape == (10, 1, 2, 2)
    assert torch.equal(part, torch.cat([full[8:], full[4:8]]))


def test_api_samples_with_dpmpp_and_a_spacing():
    from ddpm import GaussianDiffusion, Unet

    torch.manual_seed(0)
    model = Unet(dim=8, dim_mults=(1, 2), channels=1)
    d = GaussianDiffusion(model, image_size=8, timesteps=100, sampling_timesteps=10, sampler="dpmpp_2m",
                          spacing="trailing", objective="pred_v", beta_schedule="sigmoid")
    assert d.rule == StepRule("dpmpp_2m", 0.0, "trailing") and not d.is_ddim_sampling
    x = d.sample(3, generator=torch.Generator().manual_seed(1))
    ref = sample_loop(model, d.process, (3, 1, 8, 8), 10, StepRule("dpmpp_2m", 0.0, "trailing"),
                      torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, (ref + 1) / 2)
    assert GaussianDiffusion(model, image_size=8, timesteps=100, sampling_timesteps=10).rule == StepRule("ddim")
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        GaussianDiffusion(model, image_size=8, timesteps=100, sampler="dpm")
    with pytest.raises(ValueError, match="steps=100 with spacing 'linspace' gives repeated timesteps"):
        GaussianDiffusion(model, image_size=8, timesteps=100, sampler="dpmpp_2m")  # S = T needs 'trailing'


# --- per-index noise (issue 26 item 4): x_T and every step's z are a function of (seed, index, step) ---
STOCHASTIC = [StepRule("ddpm"), StepRule("ddpm_large"), StepRule("ddim", 0.5), StepRule("dpmpp_2m_sde")]


@pytest.mark.parametrize("rule", STOCHASTIC, ids=lambda r: r.label)
def test_stochastic_sets_do_not_depend_on_batch_size_or_chunk_order(rule):
    p = GaussianProcess(get_beta_schedule("linear", 100))
    model = GaussianOracle(p.alpha_bar64, "pred_noise")
    whole = sample_images(model, p, 450, (1, 2, 2), 10, rule, seed=5, batch_size=400)
    small = sample_images(model, p, 450, (1, 2, 2), 10, rule, seed=5, batch_size=100)
    order = sample_images(model, p, 450, (1, 2, 2), 10, rule, seed=5, batch_size=150, chunks=[2, 0, 1])
    torch.testing.assert_close(small, whole, rtol=0, atol=1e-6)  # same noise; only the batch's arithmetic
    torch.testing.assert_close(order, torch.cat([whole[300:], whole[:300]]), rtol=0, atol=1e-6)
    more = sample_images(model, p, 900, (1, 2, 2), 10, rule, seed=5, batch_size=400)
    assert torch.equal(more[:400], whole[:400])  # a larger n only appends images
    other = sample_images(model, p, 450, (1, 2, 2), 10, rule, seed=6, batch_size=400)
    assert not torch.allclose(other, whole)


def test_the_first_block_is_the_stream_of_chunk_zero():
    """A set drawn at batch 400 is what it was before per-index noise: block 0's generator as one stream
    (x_T, then one z per noisy step), so the committed sample sets keep their images."""
    from ddpm.diffusion.samplers import NOISE_BLOCK, chunk_generator

    p = GaussianProcess(get_beta_schedule("cosine", 100))
    model = GaussianOracle(p.alpha_bar64, "pred_noise")
    for rule in (StepRule("ddpm"), StepRule("ddim", 0.0)):
        ours = sample_images(model, p, NOISE_BLOCK, (1, 2, 2), 10, rule, seed=0, batch_size=NOISE_BLOCK)
        stream = sample_loop(model, p, (NOISE_BLOCK, 1, 2, 2), 10, rule, chunk_generator(0, 0, "cpu"))
        assert torch.equal(ours, stream)


def test_schedules_share_x_T_and_step_noise_per_index(monkeypatch):
    import ddpm.diffusion.samplers as samplers

    seen = {}

    class Spy(samplers.IndexedNoise):
        def initial(self):
            z = super().initial()
            self.log = [z]
            seen.setdefault((self.key, self.start), []).append(self.log)
            return z

        def step(self, i):
            z = super().step(i)
            self.log.append((i, z))
            return z

    for key, schedule, batch in (("a", "linear", 400), ("b", "cosine", 100)):
        Spy.key = key
        monkeypatch.setattr(samplers, "IndexedNoise", Spy)
        p = GaussianProcess(get_beta_schedule(schedule, 200))
        sample_images(GaussianOracle(p.alpha_bar64, "pred_noise"), p, 400, (1, 2, 2), 8, StepRule("ddpm"), seed=1,
                      batch_size=batch)
    (a,) = seen[("a", 0)]
    b = [seen[("b", start)][0] for start in (0, 100, 200, 300)]
    assert torch.equal(a[0], torch.cat([log[0] for log in b]))  # x_T
    assert [i for i, _ in a[1:]] == list(range(7))  # every step but the last adds noise
    for k, (i, z) in enumerate(a[1:], start=1):
        assert torch.equal(z, torch.cat([log[k][1] for log in b])), i


def test_indexed_noise_skips_and_refuses_to_go_back():
    from ddpm.diffusion.samplers import IndexedNoise

    a, b = IndexedNoise(0, 10, 5, (1, 2, 2), "cpu"), IndexedNoise(0, 0, 20, (1, 2, 2), "cpu")
    assert torch.equal(a.initial(), b.initial()[10:15])
    z3 = a.step(3)  # steps 0-2 drawn and dropped
    for i in range(3):
        b.step(i)
    assert torch.equal(z3, b.step(3)[10:15])
    with pytest.raises(RuntimeError, match="steps must increase"):
        a.step(2)
