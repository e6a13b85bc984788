"""Batch shards in parallel CPU threads (ddpm.parallel): the same rows as one batch, reproducible training
with dropout per shard, and the caller's thread settings and grad mode left alone."""
import pytest
import torch

from ddpm.diffusion import GaussianProcess
from ddpm.parallel import MIN_SHARD, ShardedModel, cpu_workers, sharded_backward, shard_slices
from ddpm.samplers import StepRule, sample_loop
from ddpm.schedules import get_beta_schedule
from ddpm.speed import Speed, sampling_model
from ddpm.train import TrainSettings, train
from ddpm.unet import Unet, dropout, dropout_generator


def tiny(dropout_p=0.0, seed=0):
    torch.manual_seed(seed)
    return Unet(dim=8, dim_mults=(1, 2), channels=1, dropout=dropout_p, attn_heads=2, attn_dim_head=8)


@pytest.mark.parametrize("n,workers", [(10, 2), (11, 2), (7, 3), (1, 2), (0, 2)])
def test_shards_cover_every_row_once_in_order(n, workers):
    shards = shard_slices(n, workers)
    rows = [i for s in shards for i in range(n)[s]]
    assert rows == list(range(n))
    sizes = [s.stop - s.start for s in shards]
    assert all(size > 0 for size in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)


@pytest.mark.parametrize("same_t", [False, True])
def test_sharded_model_gives_the_batch_rows(same_t):
    net = tiny().to(memory_format=torch.channels_last).eval()
    x = torch.randn(37, 1, 8, 8)
    t = torch.tensor(412).expand(37) if same_t else torch.randint(0, 1000, (37,))
    sharded = ShardedModel(net, workers=2, max_chunk=8)  # 19 + 18 rows, each run as 3 chunks
    threads = torch.get_num_threads()
    with torch.inference_mode():
        want, got = net(x, t), sharded(x, t)
    assert got.shape == want.shape == (37, 1, 8, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.get_num_threads() == threads  # the workers' single thread is theirs alone


def test_one_t_for_the_batch_embeds_once_with_the_same_result():
    net = tiny().eval()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        full = net(x, torch.full((6,), 250))
        once = net(x, torch.tensor(250).expand(6))
        scalar = net(x, 250)
    torch.testing.assert_close(once, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scalar, full, rtol=1e-5, atol=1e-6)


def test_small_batches_and_grad_mode_pass_through():
    net = tiny().eval()
    x, t = torch.randn(2 * MIN_SHARD - 1, 1, 8, 8), torch.randint(0, 1000, (2 * MIN_SHARD - 1,))
    with torch.no_grad():
        torch.testing.assert_close(ShardedModel(net)(x, t), net(x, t), rtol=0, atol=0)  # one batch: same call
    x, t = torch.randn(32, 1, 8, 8), torch.randint(0, 1000, (32,))
    with torch.no_grad():
        assert not ShardedModel(net)(x, t).requires_grad  # no_grad holds in the workers too
    out = ShardedModel(net)(x, t)
    assert out.requires_grad  # and grad mode too


def test_sampling_model_shards_on_cpu_only_where_fast_says():
    net = tiny()
    assert isinstance(sampling_model(net, Speed(False, True, False, None, 2), 10, "cpu"), ShardedModel)
    assert sampling_model(net, Speed(False, True, False, None, 1), 10, "cpu") is net
    assert Speed.resolve(False, "cpu").cpu_shards == 1  # fast: false is plain eager
    assert Speed.resolve(True, "cpu").cpu_shards == cpu_workers("cpu")
    assert cpu_workers("cuda") == 1


def test_sharded_sampling_draws_the_same_images():
    net = tiny().to(memory_format=torch.channels_last)
    process = GaussianProcess(get_beta_schedule("linear", 100))

    def draw(model):
        return sample_loop(model, process, (40, 1, 8, 8), 5, StepRule("ddpm"), torch.Generator().manual_seed(3))

    torch.testing.assert_close(draw(ShardedModel(net, max_chunk=16)), draw(net), rtol=1e-4, atol=1e-5)


def test_dropout_generator_is_per_block_and_leaves_the_global_rng():
    x = torch.ones(4, 8, 3, 3)
    state = torch.get_rng_state()
    with dropout_generator(torch.Generator().manual_seed(5)):
        a = dropout(x, 0.5, True)
    with dropout_generator(torch.Generator().manual_seed(5)):
        b = dropout(x, 0.5, True)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    assert set(a.unique().tolist()) == {0.0, 2.0}


def test_sharded_gradients_sum_to_the_batch_gradient():
    net = tiny()
    process = GaussianProcess(get_beta_schedule("linear", 100))
    x0, noise = torch.randn(32, 1, 8, 8).clamp(-1, 1), torch.randn(32, 1, 8, 8)
    t = torch.randint(0, 100, (32,))

    def loss_fn(a, b, c):
        return process.losses(net, a, b, c)

    per_sample = loss_fn(x0, t, noise)
    per_sample.mean().backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    got_loss = sharded_backward(loss_fn, x0, t, noise, 1 / 32, workers=2, seeds=[0, 1])
    torch.testing.assert_close(got_loss, per_sample.detach(), rtol=1e-5, atol=1e-6)
    for w, p in zip(want, net.parameters()):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)


def test_sharded_training_is_reproducible_and_trains_like_one_batch():
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    process = GaussianProcess(get_beta_schedule("linear", 100))

    def run(shards, p):
        s = TrainSettings(steps=4, batch_size=32, log_every=2, checkpoint_every=1000, cpu_shards=shards,
                          channels_last=True)
        return train(tiny(p), process, images, s, seed=1, progress=False)

    a, b = run(2, 0.1), run(2, 0.1)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    one, two = run(1, 0.0), run(2, 0.0)  # without dropout the shards change only the float rounding
    for x, y in zip(one.model.state_dict().values(), two.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)
