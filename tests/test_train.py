import math

import pytest
import torch

from ddpm.data.datasets import load_dataset
from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.training.checkpoint import list_checkpoints, load_model, model_metadata
from ddpm.training.loop import NonFiniteLossError, TrainSettings, checkpoint_path, train
from ddpm.nn.unet import Unet


@pytest.fixture(scope="module")
def digits():
    return torch.from_numpy(load_dataset("digits").images[:256])


def setup(seed=0, T=100):
    torch.manual_seed(seed)
    model = Unet(dim=8, dim_mults=(1, 2), channels=1, dropout=0.1, attn_heads=1, attn_dim_head=8)
    process = GaussianProcess(get_beta_schedule("linear", T))
    return model, process


def settings(**kw):
    base = dict(steps=12, batch_size=16, lr=2e-3, log_every=4, checkpoint_every=4, keep_checkpoints=2, ema_decay=0.9)
    return TrainSettings(**{**base, **kw})


def states_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_loss_falls_on_digits(digits):
    model, process = setup()
    r = train(model, process, digits, settings(steps=150, batch_size=32, log_every=10, checkpoint_every=1000),
              seed=0, progress=False)
    first = sum(row["loss"] for row in r.history[:10]) / 10
    last = sum(row["loss"] for row in r.history[-10:]) / 10
    assert len(r.history) == 150 and last < 0.6 * first, (first, last)
    quarters = [row[f"loss_q{q}"] for row in r.history[-20:] for q in range(4)]
    assert any(math.isfinite(v) for v in quarters)


def test_resume_after_crash_is_bit_identical(digits, tmp_path):
    model, process = setup()
    ref = train(model, process, digits, settings(), seed=3, checkpoint_dir=tmp_path / "a", progress=False)

    class Crash(Exception):
        pass

    def crash(rows):
        if rows[-1]["step"] >= 8:
            raise Crash

    model, process = setup()
    with pytest.raises(Crash):
        train(model, process, digits, settings(), seed=3, checkpoint_dir=tmp_path / "b", on_log=crash, progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [4]  # step 8 crashed before its checkpoint
    model, process = setup(seed=99)  # different init: everything must come from the checkpoint
    resumed = train(model, process, digits, settings(), seed=3, checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from == 4
    assert states_equal(resumed.model, ref.model) and states_equal(resumed.ema, ref.ema)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in ref.history]
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [12, 8]  # keep_checkpoints=2


def test_corrupt_newest_checkpoint_falls_back(digits, tmp_path, caplog):
    model, process = setup()
    train(model, process, digits, settings(steps=8), seed=0, checkpoint_dir=tmp_path, progress=False)
    newest = checkpoint_path(tmp_path, 8)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    model, process = setup()
    r = train(model, process, digits, settings(steps=8), seed=0, checkpoint_dir=tmp_path, progress=False)
    assert r.resumed_from == 4
    assert "corrupt or truncated" in caplog.text and "ckpt-00000008.pt" in caplog.text


def test_other_params_do_not_resume(digits, tmp_path):
    model, process = setup()
    train(model, process, digits, settings(steps=4), seed=0, checkpoint_dir=tmp_path, run_key="a", progress=False)
    model, process = setup()
    r = train(model, process, digits, settings(steps=4), seed=0, checkpoint_dir=tmp_path, run_key="b", progress=False)
    assert r.resumed_from is None


def test_nan_loss_names_step_and_keeps_checkpoint(digits, tmp_path):
    model, process = setup()

    class Poison(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x, t):
            self.calls += 1
            out = self.inner(x, t)
            return out * float("nan") if self.calls > 6 else out

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 7 .*q0=.*ckpt-00000004\.pt"):
        train(Poison(model), process, digits, settings(), seed=0, checkpoint_dir=tmp_path, progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]


def test_checkpoint_rebuilds_model_alone(digits, tmp_path):
    model, process = setup()
    meta = model_metadata(model, process, "linear", (1, 8, 8), params={"seed": 0})
    r = train(model, process, digits, settings(steps=4), seed=0, checkpoint_dir=tmp_path, metadata=meta,
              progress=False)
    rebuilt, p2, ckpt = load_model(checkpoint_path(tmp_path, 4))
    assert ckpt["step"] == 4 and ckpt["params"] == {"seed": 0} and ckpt["image_shape"] == [1, 8, 8]
    assert states_equal(rebuilt, r.ema)
    assert torch.equal(p2.alpha_bar64, process.alpha_bar64)


def test_grad_accum_and_bad_inputs(digits):
    m, p = setup()
    r = train(m, p, digits, settings(steps=3, batch_size=16, grad_accum=2), seed=1, progress=False)
    assert r.step == 3 and all(math.isfinite(row["loss"]) for row in r.history)
    with pytest.raises(ValueError, match="batch_size=15 must be divisible by train.grad_accum=2"):
        train(m, p, digits, settings(batch_size=15, grad_accum=2), seed=1, progress=False)
    with pytest.raises(ValueError, match="uint8"):
        train(m, p, digits.float(), settings(), seed=1, progress=False)


@pytest.mark.parametrize("channels_last", [False, True])
def test_flat_parameters_train_like_per_tensor(digits, monkeypatch, channels_last):
    """FlatParams (one buffer for weights, one for gradients) changes nothing beyond float rounding."""
    import ddpm.training.loop as tr

    s = settings(steps=6, checkpoint_every=1000, channels_last=channels_last)
    model, process = setup()
    flat = train(model, process, digits, s, seed=1, progress=False)
    monkeypatch.setattr(tr.FlatParams, "possible", staticmethod(lambda params: False))
    model, process = setup()
    per_tensor = train(model, process, digits, s, seed=1, progress=False)
    # Compared as functions: a conv bias right before a one-channel GroupNorm gets a gradient of pure
    # rounding noise, which Adam scales to +-lr, so such weights differ while the outputs do not.
    x, t = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8) * 12
    for a, b in ((flat.model, per_tensor.model), (flat.ema, per_tensor.ema)):
        for (name, w), v in zip(a.state_dict().items(), b.state_dict().values()):
            assert w.shape == v.shape and w.stride() == v.stride(), name
        with torch.no_grad():
            torch.testing.assert_close(a.eval()(x, t), b.eval()(x, t), rtol=1e-4, atol=1e-5)
    assert [r["loss"] for r in flat.history] == pytest.approx([r["loss"] for r in per_tensor.history], rel=1e-5)
    # the trained model's weights are views of one buffer, in channels_last where asked
    conv = flat.model.downs[0][0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert conv.untyped_storage().data_ptr() == flat.model.final_conv.weight.untyped_storage().data_ptr()


def test_per_tensor_optimizer_state_loads_flat():
    """A checkpoint's optimizer state saved per parameter tensor resumes into the flat optimizer."""
    from ddpm.training.loop import FlatParams, flat_optimizer_state

    torch.manual_seed(0)
    model = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 1, 8, 8).contiguous(memory_format=torch.channels_last), torch.tensor([1, 2, 3, 4])).square().mean().backward()
    opt.step()
    saved = opt.state_dict()
    params = list(model.parameters())
    expected = [opt.state[p]["exp_avg"].clone() for p in params]
    flat = FlatParams(params)
    flat_opt = torch.optim.AdamW([flat.param], lr=1e-3)
    flat_opt.load_state_dict(flat_optimizer_state(saved, flat))
    moments = flat_opt.state[flat.param]["exp_avg"]
    for view, e in zip(flat.views(moments), expected):
        assert torch.equal(view, e)
    assert float(flat_opt.state[flat.param]["step"]) == 1.0
