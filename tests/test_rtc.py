"""Real-time chunking (dpag_engine/rtc.py): inpainting of the committed prefix on every backend.

Backends: "torch" (DPAGPolicy.predict_action on the reference ops), "triton" (the same, with the
fused sampler_step_inpaint kernel; TRITON_INTERPRET=1 on a CPU machine) and "cpp" (the CpuRuntime planner,
the C++ engine's own loop, dp and guided modes). Errors are compared in
normalised action units, as in test_cpu_runtime.py.
"""
from __future__ import annotations

import importlib
import zlib

import pytest
import torch
from torch import nn

from dpag_engine import ops
from dpag_engine.config import SchedulerConfig
from dpag_engine.ops import torch_ref as R
from dpag_engine.rtc import DelayEstimator, committed_prefix, most_coherent, prefix_weights
from dpag_engine.session import TimedPlanner
from factories import make_obs, make_policy, normalised_error

try:
    K = importlib.import_module("dpag_engine.kernels")
except ImportError:  # a checkout whose install does not map dpag_engine.kernels
    K = None
needs_triton = pytest.mark.skipif(K is None, reason="dpag_engine.kernels is not importable")
try:
    from dpag_engine.runtime.cpu import CpuRuntime
except ImportError:
    CpuRuntime = None
needs_cpp = pytest.mark.skipif(CpuRuntime is None, reason="dpag_engine._C is not built")

ATOL = 1e-5
SCHEDULERS = {
    "ddim8": SchedulerConfig(num_inference_steps=8),                 # deterministic
    "ddim4-eta1": SchedulerConfig(num_inference_steps=4, eta=1.0),   # stochastic: per-step noise too
}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def expected_prefix(policy, prefix):
    """The committed actions as the sampler can produce them: normalised, clipped, un-normalised."""
    clip = policy.schedule.clip
    return policy.normalizer.unnormalize("action", policy.normalizer.normalize("action", prefix).clamp(-clip, clip))


def plan(policy, backend, obs, seed, mode="dp", **rtc):
    gen = torch.Generator().manual_seed(seed)
    if backend == "cpp":
        return CpuRuntime.planner(policy, max_batch=obs["state"].shape[0]).predict_action(obs, gen, mode=mode, **rtc)["action_pred"]
    with ops.use_backend(backend):
        return policy.predict_action(obs, gen, mode=mode, **rtc)["action_pred"]


def random_prefix(policy, batch, p, gen):
    """Raw actions over (and a little beyond) the data range, so the clip matters for some entries."""
    lo, hi = policy.normalizer.action_min, policy.normalizer.action_max
    u = torch.rand(batch, p, policy.cfg.action_dim, generator=gen) * 1.2 - 0.1
    return lo + u * (hi - lo)


BACKEND_MODES = [
    pytest.param("torch", "dp", id="torch-dp"),
    pytest.param("torch", "guided", id="torch-guided"),
    pytest.param("triton", "dp", id="triton-dp", marks=needs_triton),
    pytest.param("triton", "guided", id="triton-guided", marks=needs_triton),
    pytest.param("cpp", "dp", id="cpp-dp", marks=needs_cpp),
    pytest.param("cpp", "guided", id="cpp-guided", marks=needs_cpp),
]


# ---- (1) the committed rows come out as the committed actions ----
@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("backend,mode", BACKEND_MODES)
def test_prefix_equals_committed_actions_at_the_end(backend, mode, sched):
    policy = make_policy(seed=11, scheduler=SCHEDULERS[sched]).eval()
    cfg = policy.cfg
    start = cfg.n_obs_steps - 1
    gen = torch.Generator().manual_seed(zlib.crc32(f"{backend}-{mode}-{sched}".encode()))  # fresh per case
    obs = make_obs(cfg, 3, gen)
    p, s = 3, 2
    prefix = random_prefix(policy, 3, p + s, gen)
    weights = prefix_weights(p, s)
    out = plan(policy, backend, obs, 7, mode, prefix=prefix, prefix_weight=weights)
    assert out.shape == (3, cfg.horizon, cfg.action_dim) and torch.isfinite(out).all()
    err = normalised_error(policy, out[:, start:start + p], expected_prefix(policy, prefix[:, :p]))
    assert err <= ATOL, f"committed rows differ from the committed actions by {err:.2e} (normalised)"
    # The soft rows are pulled, not pinned; the rest of the chunk is the model's.
    assert normalised_error(policy, out[:, start + p:start + p + s], expected_prefix(policy, prefix[:, p:])) > 1e-3


# ---- (2) no prefix = the plain sampler, bit for bit, same draws ----
@pytest.mark.parametrize("backend", [pytest.param("torch"), pytest.param("triton", marks=needs_triton),
                                     pytest.param("cpp", marks=needs_cpp)])
def test_empty_prefix_is_the_plain_sampler(backend):
    policy = make_policy(seed=12, scheduler=SCHEDULERS["ddim4-eta1"]).eval()
    obs = make_obs(policy.cfg, 2, torch.Generator().manual_seed(1))
    runs = {}
    for name, rtc in {"plain": {}, "none": {"prefix": None}, "empty": {"prefix": torch.zeros(2, 0, 3)},
                      "empty-weights": {"prefix": torch.zeros(2, 0, 3), "prefix_weight": torch.zeros(0)}}.items():
        gen = torch.Generator().manual_seed(3)
        if backend == "cpp":
            out = CpuRuntime.planner(policy, max_batch=2).predict_action(obs, gen, **rtc)["action_pred"]
        else:
            with ops.use_backend(backend):
                out = policy.predict_action(obs, gen, **rtc)["action_pred"]
        runs[name] = (out, torch.randn(4, generator=gen))  # the generator's next draw: same stream
    for name, (out, after) in runs.items():
        assert torch.equal(out, runs["plain"][0]), name
        assert torch.equal(after, runs["plain"][1]), name


# ---- (3) the backends agree with a prefix ----
@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("mode", ["dp", "guided"])
def test_backends_agree_with_a_prefix(mode, sched):
    policy = make_policy(seed=13, scheduler=SCHEDULERS[sched]).eval()
    gen = torch.Generator().manual_seed(4)
    obs = make_obs(policy.cfg, 2, gen)
    prefix = random_prefix(policy, 2, 5, gen)
    rtc = {"prefix": prefix, "prefix_weight": prefix_weights(2, 3)}
    ref = plan(policy, "torch", obs, 5, mode, **rtc)
    others = ["triton"] * (K is not None) + ["cpp"] * (CpuRuntime is not None)
    if not others:
        pytest.skip("no other backend available")
    for backend in others:
        err = normalised_error(policy, plan(policy, backend, obs, 5, mode, **rtc), ref)
        assert err <= ATOL, f"{backend} vs torch: {err:.2e} (normalised)"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_step_inpaint_kernel_matches_reference(dtype):
    policy = make_policy(scheduler=SCHEDULERS["ddim4-eta1"])
    sched = policy.schedule
    gen = torch.Generator().manual_seed(5)
    b, h, da, w, start = 3, 16, 5, 6, 1
    x, eps, noise = (torch.randn(b, h, da, generator=gen).to(dtype) for _ in range(3))
    pre = torch.randn(b, w, da, generator=gen).to(dtype)
    pre_noise = torch.randn(sched.num_steps, b, w, da, generator=gen).to(dtype)
    weight = prefix_weights(3, 3)
    for step in (0, 2, torch.tensor(sched.num_steps - 1), -1):  # host ints and a device scalar
        got = K.sampler_step_inpaint(x, eps, sched.coefs, step, noise, 1.0, pre, pre_noise, weight,
                                     sched.inpaint_coefs, start)
        want = R.sampler_step_inpaint(x.double(), eps.double(), sched.coefs, step, noise.double(), 1.0,
                                      pre.double(), pre_noise.double(), weight, sched.inpaint_coefs, start)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r.to(dtype), **tol)
    with pytest.raises(ValueError, match="prefix must be"):
        K.sampler_step_inpaint(x, eps, sched.coefs, 0, None, 1.0, pre, pre_noise, weight, sched.inpaint_coefs, 11)


# ---- (4) RTC removes the jump at the chunk boundary of a multimodal policy ----
class ModeDenoiser(nn.Module):
    """The Bayes-optimal epsilon for data that is one of M constant chunks (equally likely, whatever
    the observation): a policy whose plans are strongly multimodal, so two plans from different seeds
    usually pick different modes and the arm jumps at the switch. Stands in for policy.unet."""

    def __init__(self, templates: torch.Tensor, sqrt_ac: torch.Tensor, sqrt_1m_ac: torch.Tensor):
        super().__init__()
        self.templates, self.sqrt_ac, self.sqrt_1m_ac = templates, sqrt_ac, sqrt_1m_ac

    def forward(self, sample, t, global_cond):
        a, s = self.sqrt_ac[t], self.sqrt_1m_ac[t]
        d2 = (sample[:, None] - a * self.templates[None]).square().sum(dim=(2, 3))     # (B, M)
        post = torch.softmax(-d2 / (2 * s * s), dim=1)
        x0 = torch.einsum("bm,mhd->bhd", post, self.templates)
        return (sample - a * x0) / s + 0 * global_cond.sum()


def mode_policy(seed: int):
    """A tiny policy whose noise predictor is ModeDenoiser: 8 equally likely constant-chunk modes."""
    policy = make_policy(seed=seed, scheduler=SCHEDULERS["ddim8"]).eval()
    cfg, sched = policy.cfg, policy.schedule
    signs = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0])] * cfg.action_dim)
    templates = 0.6 * signs[:, None, :].expand(-1, cfg.horizon, -1).contiguous()
    policy.unet = ModeDenoiser(templates, sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    return policy


@pytest.mark.parametrize("p,soft,max_ratio", [
    (3, 0, 0.9),    # hard inpainting of a short prefix only: replacement does not harmonise the rest
    (8, 0, 0.1),    # a longer committed prefix pins the mode
    (3, 8, 0.05),   # short prefix + chunk n's next 8 actions as soft rows (the RTC recipe)
], ids=["hard3", "hard8", "hard3-soft8"])
@pytest.mark.parametrize("backend", [pytest.param("torch"), pytest.param("triton", marks=needs_triton)])
def test_rtc_removes_the_boundary_jump_of_a_multimodal_policy(backend, p, soft, max_ratio):
    policy = mode_policy(seed=14)
    cfg = policy.cfg
    start, batch = cfg.n_obs_steps - 1, 64
    obs = make_obs(cfg, batch, torch.Generator().manual_seed(6))
    scale = policy.normalizer.affine("action", torch.float32).scale
    with ops.use_backend(backend):
        old = policy.predict_action(obs, torch.Generator().manual_seed(100))["action_pred"]
        prefix = old[:, start:start + p + soft]    # chunk n's actions: committed, then the soft rows
        plain = policy.predict_action(obs, torch.Generator().manual_seed(200))["action_pred"]
        rtc = policy.predict_action(obs, torch.Generator().manual_seed(200), prefix=prefix,
                                    prefix_weight=prefix_weights(p, soft))["action_pred"]

    def jump(chunk):  # first non-committed action vs the last committed one, normalised L2, mean over B
        return float(((chunk[:, start + p] - prefix[:, p - 1]) * scale).norm(dim=-1).mean())

    j_plain, j_rtc = jump(plain), jump(rtc)
    print(f"{backend} P={p} soft={soft}: mean boundary jump without RTC {j_plain:.3f}, with RTC {j_rtc:.3f}")
    assert j_plain > 1.0                  # the fixture does jump: plans pick different modes
    assert j_rtc < max_ratio * j_plain    # RTC continues the committed mode


# ---- (4b) Holding the mode: K candidates, the one closest to the executing chunk ----
def test_most_coherent_picks_the_closest_overlap():
    g = torch.Generator().manual_seed(3)
    cands = torch.randn(5, 6, 2, generator=g, dtype=torch.float64)
    ref = cands[3, :4] + 0.01 * torch.randn(4, 2, generator=g, dtype=torch.float64)
    cands[3, 4:] += 100.0                       # past the overlap: does not count
    assert most_coherent(cands, ref) == 3
    longer = torch.cat([cands[1], 50 * torch.randn(3, 2, generator=g, dtype=torch.float64)])
    assert most_coherent(cands.numpy(), longer.numpy()) == 1   # only the candidates' 6 rows overlap
    assert most_coherent(cands, torch.empty(0, 2)) == 0         # nothing to continue
    with pytest.raises(ValueError, match="expected candidates"):
        most_coherent(cands[0], ref)
    with pytest.raises(ValueError, match="expected candidates"):
        most_coherent(cands, ref[:, :1])
    bad = ref.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        most_coherent(cands, bad)


@pytest.mark.parametrize("runtime", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_candidates_return_the_batch_member_closest_to_the_reference(runtime):
    policy = make_policy(seed=21).eval()
    cfg, k = policy.cfg, 4
    obs = make_obs(cfg, 1, torch.Generator().manual_seed(22))
    reference = 2 + 3 * torch.randn(7, cfg.action_dim, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    timed = TimedPlanner(policy, "dp", runtime, threads=1, candidates=k)
    chosen = timed(obs, generator=torch.Generator().manual_seed(24), reference=reference.numpy())
    # Independently: the same K draws as one batch of the plain planner, the closest picked by hand.
    planner = TimedPlanner(policy, "dp", runtime, threads=1).planner
    batch = {key: v.expand(k, *v.shape[1:]).contiguous() for key, v in obs.items()}
    rows = planner.predict_action(batch, torch.Generator().manual_seed(24))["action_pred"][:, cfg.n_obs_steps - 1:].double()
    distances = [float((rows[i, :7] - reference).square().sum()) for i in range(k)]
    assert len(set(round(d, 6) for d in distances)) == k          # the candidates differ
    torch.testing.assert_close(torch.from_numpy(chosen), rows[distances.index(min(distances))])
    # No reference (the first plan of an episode): one sample, not K.
    assert timed(obs, generator=torch.Generator().manual_seed(24)).shape == rows.shape[1:]
    with pytest.raises(ValueError, match="candidates"):
        TimedPlanner(policy, "dp", runtime, threads=1, candidates=0)


def test_candidates_keep_the_mode_of_a_multimodal_policy():
    policy = mode_policy(seed=14)
    cfg = policy.cfg
    obs = make_obs(cfg, 1, torch.Generator().manual_seed(6))
    scale = policy.normalizer.affine("action", torch.float32).scale.double()

    def kept(candidates):   # plans that continue the executing chunk's mode (normalised distance < 0.3)
        timed = TimedPlanner(policy, "dp", "torch", candidates=candidates)
        n = 0
        for trial in range(48):
            old = timed(obs, generator=torch.Generator().manual_seed(1000 + trial))
            new = timed(obs, generator=torch.Generator().manual_seed(5000 + trial), reference=old)
            n += float(((torch.from_numpy(new - old) * scale).norm(dim=-1)).mean()) < 0.3
        return n / 48

    one, eight = kept(1), kept(8)
    print(f"mode kept: 1 sample {one:.2f}, best of 8 {eight:.2f}")
    assert one < 0.3              # 1/8 by chance
    assert eight > 0.4            # 1 - (7/8)^8 = 0.66 if one of the 8 is in the mode (0.54 measured)


# ---- (5) committed_prefix and the delay estimator on a hand-made timeline ----
def test_committed_prefix_on_a_timeline():
    dt = 0.1
    prev = torch.arange(8, dtype=torch.float32)[:, None] * torch.tensor([1.0, -1.0])   # row j = (j, -j)
    # Chunk n's first action was due at t = 2.0; the new observation is at t = 2.3 (its row 3) and
    # planning takes 0.25 s: new rows 0, 1, 2 (t = 2.3, 2.4, 2.5) execute from chunk n; row 3 (2.6) is new.
    cp = committed_prefix(prev, 2.0, dt, 2.3, 0.25)
    assert cp.n_committed == 3
    torch.testing.assert_close(cp.actions, prev[3:6])
    torch.testing.assert_close(cp.weights, torch.ones(3))
    # A delay of exactly 2 dt commits 2 (the new plan is there when row 2 is due); 0 commits none.
    assert committed_prefix(prev, 2.0, dt, 2.3, 0.2).n_committed == 2
    assert committed_prefix(prev, 2.0, dt, 2.3, 0.0).actions.shape == (0, 2)
    # Soft rows continue chunk n with decaying weights; they stop where chunk n ends (row 7).
    cp = committed_prefix(prev, 2.0, dt, 2.3, 0.25, soft_steps=3)
    torch.testing.assert_close(cp.actions, prev[3:8])
    torch.testing.assert_close(cp.weights, torch.tensor([1, 1, 1, 0.75, 0.5]))
    cp = committed_prefix(prev, 2.0, dt, 2.3, 0.25, soft_steps=3, max_len=4)
    assert cp.actions.shape == (4, 2) and cp.n_committed == 3
    assert committed_prefix(prev, 2.0, dt, 2.3, 1.0).n_committed == 5          # only 5 rows left
    # Off the grid: observation at 2.35 reads chunk n at 3.5, 4.5, ... (linear interpolation); batched.
    cp = committed_prefix(prev[None].expand(2, -1, -1), 2.0, dt, 2.35, 0.15)
    assert cp.n_committed == 2
    torch.testing.assert_close(cp.actions, torch.tensor([[3.5, -3.5], [4.5, -4.5]]).expand(2, -1, -1))
    with pytest.raises(ValueError, match="before the previous chunk"):
        committed_prefix(prev, 2.0, dt, 1.9, 0.2)
    with pytest.raises(ValueError, match="exceed max_len"):
        committed_prefix(prev, 2.0, dt, 2.0, 0.45, max_len=4)
    assert prefix_weights(0, 1).tolist() == [0.5]

    est = DelayEstimator(window=4, quantile=0.75, initial_s=0.2)
    assert est.estimate() == 0.2
    for lat in (0.5, 0.11, 0.12, 0.13, 0.14):   # 0.5 drops out of the 4-plan window
        est.update(lat)
    assert est.estimate() == 0.13 and est.steps(0.1) == 2
    est.update(0.31)
    assert est.estimate() == 0.14
    with pytest.raises(ValueError):
        est.update(float("nan"))


# ---- (6) bad input ----
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_bad_prefix_fails_clearly(backend):
    policy = make_policy().eval()
    obs = make_obs(policy.cfg, 2, torch.Generator().manual_seed(0))
    step = CpuRuntime.planner(policy, max_batch=2).predict_action if backend == "cpp" else policy.predict_action
    good = torch.zeros(2, 3, 3)
    cases = [
        ({"prefix": torch.zeros(2, 3)}, r"prefix: expected shape \(2, P, 3\)"),
        ({"prefix": torch.zeros(1, 3, 3)}, r"prefix: expected shape \(2, P, 3\)"),
        ({"prefix": torch.zeros(2, 3, 4)}, r"prefix: expected shape \(2, P, 3\)"),
        ({"prefix": [[0.0]]}, r"prefix: expected shape"),
        ({"prefix": torch.zeros(2, 16, 3)}, r"prefix: 16 actions do not fit the 15 horizon rows"),
        ({"prefix": good.clone().index_fill_(1, torch.tensor([1]), float("nan"))}, "prefix: contains NaN"),
        ({"prefix": good, "prefix_weight": torch.ones(2)}, r"prefix_weight: expected shape \(3,\)"),
        ({"prefix": good, "prefix_weight": torch.tensor([1.0, 0.5, 1.5])}, r"prefix_weight: .*in \[0, 1\]"),
        ({"prefix": good, "prefix_weight": torch.tensor([1.0, float("nan"), 0.0])}, r"prefix_weight: .*finite"),
        ({"prefix_weight": torch.ones(3)}, "prefix_weight: given without a prefix"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            step(obs, torch.Generator().manual_seed(0), **kwargs)
