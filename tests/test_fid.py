"""Tests for ddpm.metrics.fid: Frechet distance maths, the digits classifier featurizer, checkpoints and the
offline pytorch-fid Inception path (random weights saved locally; no network, ever)."""
from __future__ import annotations

import socket
import urllib.request
import warnings

import numpy as np
import pytest
import torch

from ddpm.metrics import features, fid
from ddpm.metrics.features import (ClassifierFeaturizer, InceptionFeaturizer, extract_features, load_featurizer,
                                   make_featurizer, save_featurizer, train_classifier)
from ddpm.metrics.fid import feature_statistics, fid_from_features, frechet_distance

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    labels = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(images))
    n_train = int(0.8 * len(images))
    tr, va = perm[:n_train], perm[n_train:]
    return images[tr], labels[tr], images[va], labels[va]


TRAIN_KW = dict(epochs=6, width=16, feature_dim=16, batch_size=64, seed=123, progress=False)


@pytest.fixture(scope="module")
def trained(digits):
    x_tr, y_tr, x_va, y_va = digits
    return train_classifier(x_tr, y_tr, x_va, y_va, **TRAIN_KW)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test loudly (not with a FileNotFoundError)."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    import pytorch_fid.inception as pfi

    monkeypatch.setattr(pfi, "load_state_dict_from_url", refuse)


@pytest.fixture
def one_thread():
    """Inception on a busy 2-core machine: 1 intra-op thread measured ~4x faster than 2."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """State dict of pytorch-fid's fid_inception_v3 architecture with random init, saved in a fake
    torch hub cache (TORCH_HOME/hub/checkpoints/<name>) and hard-linked to a second, explicit path."""
    home = tmp_path_factory.mktemp("torch_home")
    ckpt_dir = home / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = features.fid_inception_v3_architecture()
    hub_file = ckpt_dir / WEIGHTS_NAME
    torch.save(net.state_dict(), hub_file)
    explicit = home / "my_weights.pth"
    explicit.hardlink_to(hub_file)
    return home, explicit


def _tiny_gray(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 1, 8, 8), dtype=np.uint8)


def _random_cov(rng, d, n=None):
    a = rng.standard_normal((n or 3 * d, d)) @ rng.standard_normal((d, d))
    return np.cov(a, rowvar=False)


# --------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------
def test_frechet_of_set_with_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((500, 32)) * 3 + 1
    mu, sigma = feature_statistics(feats)
    assert mu.shape == (32,) and sigma.shape == (32, 32)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    assert abs(fid_from_features(feats, feats)) < 1e-6


@pytest.mark.parametrize("d", [16, 64])
def test_frechet_matches_pytorch_fid(d):
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.5
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy 1.17 deprecates sqrtm's `disp`
        ref = float(calculate_frechet_distance(mu1, s1, mu2, s2))
    assert ours == pytest.approx(ref, rel=1e-6)
    # Close sets: the trace terms nearly cancel, the hardest case for relative accuracy.
    feats = rng.standard_normal((4 * d, d))
    m_a, s_a = feature_statistics(feats[: 2 * d] + 0.05)
    m_b, s_b = feature_statistics(feats[2 * d:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = float(calculate_frechet_distance(m_a, s_a, m_b, s_b))
    assert frechet_distance(m_a, s_a, m_b, s_b) == pytest.approx(ref, rel=1e-6)


def test_frechet_1d_closed_form():
    # N(0, 1) vs N(1, 4): (0 - 1)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 2
    assert frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([1.0]),
                            np.array([[4.0]])) == pytest.approx(2.0, abs=1e-12)
    assert frechet_distance(0.0, 1.0, 1.0, 4.0) == pytest.approx(2.0, abs=1e-12)  # scalars


def test_frechet_singular_covariances():
    # Rank-deficient covariances (fewer samples than dims): finite, non-negative, zero for itself.
    rng = np.random.default_rng(1)
    with pytest.warns(RuntimeWarning, match="singular"):
        mu, sigma = feature_statistics(rng.standard_normal((5, 20)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    assert frechet_distance(mu, sigma, mu + 1, np.eye(20)) > 0


def test_frechet_shape_errors():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="differ in length"):
        frechet_distance(mu, sigma, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu, sigma, mu, np.eye(5))
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(mu, np.ones((4, 3)), mu, sigma)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma * np.nan, mu, sigma)
    with pytest.raises(ValueError, match="same D"):
        fid_from_features(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        feature_statistics(np.zeros(10))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))


# --------------------------------------------------------------------------------------------------
# Classifier featurizer
# --------------------------------------------------------------------------------------------------
def test_classifier_trains_and_is_deterministic(digits, trained):
    model, metrics = trained
    assert metrics["val_accuracy"] > 0.9, metrics
    assert metrics["epochs"] == TRAIN_KW["epochs"]
    assert {"train_accuracy", "loss_history"} <= set(metrics) and "train_seconds" not in metrics
    x_tr, y_tr, x_va, y_va = digits
    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    model2, metrics2 = train_classifier(x_tr, y_tr, x_va, y_va, **TRAIN_KW)
    assert torch.equal(torch.get_rng_state(), state), "global RNG must not be touched"
    assert torch.get_num_threads() == threads
    assert metrics2["val_accuracy"] == metrics["val_accuracy"]
    np.testing.assert_array_equal(extract_features(model, x_va), extract_features(model2, x_va))


def test_classifier_features_separate_real_from_noise(digits, trained):
    model, _ = trained
    x_tr, _, x_va, _ = digits
    real = np.concatenate([x_tr, x_va])
    perm = np.random.default_rng(1).permutation(len(real))
    a, b = real[perm[:800]], real[perm[800:1600]]
    noise = np.random.default_rng(2).integers(0, 256, size=a.shape, dtype=np.uint8)
    fa, fb, fn = (extract_features(model, x) for x in (a, b, noise))
    assert fa.shape == (800, 16) and fa.dtype == np.float64
    fid_real = fid_from_features(fa, fb)
    fid_noise = fid_from_features(fa, fn)
    assert fid_noise > 20 * fid_real, (fid_real, fid_noise)


def test_classifier_shapes_and_input_checks():
    model = ClassifierFeaturizer(in_channels=3, num_classes=4, feature_dim=8, width=8)
    x = torch.randint(0, 256, (5, 3, 13, 9), dtype=torch.uint8)
    model.eval()
    assert model(x).shape == (5, 4)
    assert extract_features(model, x, batch_size=2).shape == (5, 8)
    assert ClassifierFeaturizer(**model.config).config == model.config
    with pytest.raises(TypeError, match="uint8"):
        model.features(x.float())
    with pytest.raises(ValueError, match="channel"):
        model.features(x[:, :1])
    with pytest.raises(ValueError, match="8x8"):
        model.features(x[:, :, :4, :4])


def test_save_load_roundtrip(tmp_path, digits, trained):
    model, metrics = trained
    path = tmp_path / "sub" / "featurizer.pt"
    save_featurizer(path, model, metrics)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"kind", "config", "state_dict", "metrics"} and ckpt["kind"] == "classifier"
    loaded = load_featurizer(path)
    assert isinstance(loaded, ClassifierFeaturizer) and not loaded.training
    assert loaded.metrics["val_accuracy"] == metrics["val_accuracy"]
    x_va = digits[2]
    np.testing.assert_array_equal(extract_features(model, x_va), extract_features(loaded, x_va))
    assert not list(path.parent.glob(".*.ddpm-tmp")), "atomic write left a temporary file"


def test_load_errors_name_the_path(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt.pt"):
        load_featurizer(corrupt)
    unknown = tmp_path / "unknown.pt"
    torch.save({"kind": "vgg", "state_dict": {}}, unknown)
    with pytest.raises(ValueError, match=r"unknown\.pt.*'vgg'"):
        load_featurizer(unknown)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_featurizer(tmp_path / "missing.pt")


def test_make_featurizer():
    m = make_featurizer("classifier", feature_dim=12)
    assert isinstance(m, ClassifierFeaturizer) and m.feature_dim == 12
    with pytest.raises(ValueError, match=r"'resnet'.*classifier.*inception"):
        make_featurizer("resnet")


# --------------------------------------------------------------------------------------------------
# pytorch-fid Inception, offline
# --------------------------------------------------------------------------------------------------
def test_inception_missing_weights_no_network(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(FileNotFoundError) as err:
        InceptionFeaturizer()
    msg = str(err.value)
    assert WEIGHTS_NAME in msg and str(tmp_path / "empty_home") in msg
    assert "https://" in msg and "weights_path" in msg
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        make_featurizer("inception")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        InceptionFeaturizer(weights_path=tmp_path / "nowhere.pth")


def test_inception_from_explicit_path_and_hub_cache(tmp_path, monkeypatch, no_network, one_thread,
                                                    random_inception_weights):
    import pytorch_fid.inception as pfi

    home, explicit = random_inception_weights
    images = _tiny_gray()
    # 1) explicit weights_path; the hub cache points at an empty folder.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    by_path = InceptionFeaturizer(weights_path=explicit)
    assert isinstance(by_path.model, pfi.InceptionV3)
    assert isinstance(by_path.model.blocks[3][1], pfi.FIDInceptionE_1)  # the FID variant
    f_path = extract_features(by_path, images, batch_size=3)
    assert f_path.shape == (4, 2048) and np.isfinite(f_path).all()
    # 2) pytorch-fid's hub cache: $TORCH_HOME/hub/checkpoints/<name>.
    monkeypatch.setenv("TORCH_HOME", str(home))
    by_hub = make_featurizer("inception")
    assert by_hub.resolved_weights_path == str(home / "hub" / "checkpoints" / WEIGHTS_NAME)
    f_hub = extract_features(by_hub, images)
    np.testing.assert_allclose(f_hub, f_path, rtol=1e-5, atol=1e-6)
    # RGB input works too (grayscale is repeated to 3 channels, so the features agree).
    f_rgb = extract_features(by_hub, np.repeat(images[:2], 3, axis=1))
    np.testing.assert_allclose(f_rgb, f_hub[:2], rtol=1e-5, atol=1e-6)
    # Checkpoint stores only the weights location, not the 100 MB.
    ckpt_path = tmp_path / "inception.pt"
    save_featurizer(ckpt_path, by_path)
    assert ckpt_path.stat().st_size < 10_000
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["kind"] == "inception" and ckpt["weights_path"] == str(explicit.resolve())
    assert isinstance(load_featurizer(ckpt_path), InceptionFeaturizer)


# --------------------------------------------------------------------------------------------------
# Rulers, intervals, KID (issue 12)
# --------------------------------------------------------------------------------------------------
def _ruler():
    entry = features.SHIPPED_RULERS["digits"]
    return features.RULERS_DIR / entry["file"], entry["sha256"]


def test_shipped_ruler_checksum_is_verified(tmp_path):
    path, sha = _ruler()
    assert features.file_sha256(path) == sha
    net = features.load_ruler(path, sha)
    assert net.feature_dim == 32
    bad = tmp_path / "ruler.pt"
    bad.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        features.load_ruler(bad, sha)
    recipe = {"kind": "classifier", "feature_dim": 32, "epochs": 15, "batch_size": 64, "lr": 0.01,
              "image_size": None, "channels": None}
    assert features.shipped_ruler("digits", recipe) == (path, sha)
    assert features.shipped_ruler("digits", {**recipe, "epochs": 3}) is None
    assert features.shipped_ruler("mnist", recipe) is None
    assert features.feature_space_id("classifier", 32, sha) == f"classifier-32d-{sha[:8]}"


def test_shipped_ruler_features_identical_with_1_and_2_threads(digits):
    net = features.load_ruler(*_ruler())
    images = digits[0][:300]
    prev = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(extract_features(net, images))
    finally:
        torch.set_num_threads(prev)
    np.testing.assert_array_equal(out[0], out[1])


def test_fid_from_images_is_the_feature_pipeline(digits):
    net = features.load_ruler(*_ruler())
    real, gen = digits[0][:400], digits[0][400:800]
    mu, sigma = feature_statistics(extract_features(net, real))
    expect = frechet_distance(*feature_statistics(extract_features(net, gen)), mu, sigma)
    assert fid.fid_from_images(net, gen, mu, sigma) == pytest.approx(expect, rel=1e-12)


def test_batched_frechet_matches_frechet_distance():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 5)), rng.normal(size=(70, 5)) * 1.3 + 0.2
    counts_x = np.vstack([np.ones(50), rng.multinomial(50, np.full(50, 0.02))])
    counts_y = np.vstack([np.ones(70), rng.multinomial(70, np.full(70, 1 / 70))])
    batch = fid._frechet_batch(*fid._weighted_statistics(x, counts_x), *fid._weighted_statistics(y, counts_y))
    resampled = np.repeat(x, counts_x[1].astype(int), axis=0), np.repeat(y, counts_y[1].astype(int), axis=0)
    assert batch[0] == pytest.approx(fid.fid_from_features(x, y), rel=1e-9)
    assert batch[1] == pytest.approx(fid.fid_from_features(*resampled), rel=1e-9)


@pytest.mark.parametrize("shift, scale", [(0.0, 1.0), (0.3, 1.5)])
def test_interval_covers_the_expected_fid_on_gaussians(shift, scale):
    """Gaussians with a known Frechet distance: the plug-in FID at N is biased upwards of the closed form,
    and the interval covers its mean E[FID(N, M)] (Monte Carlo over independent draws) near 95% of the time."""
    d, n, m, reps = 4, 150, 300, 160
    rng = np.random.default_rng(1)
    a = rng.normal(size=(d, d)) / 2
    s2 = a @ a.T + 0.2 * np.eye(d)
    s1, mu1, mu2 = s2 * scale, np.full(d, shift), np.zeros(d)
    l1, l2 = np.linalg.cholesky(s1), np.linalg.cholesky(s2)
    draw = lambda: (mu1 + rng.normal(size=(n, d)) @ l1.T, mu2 + rng.normal(size=(m, d)) @ l2.T)  # noqa: E731
    closed_form = frechet_distance(mu1, s1, mu2, s2)
    expected = np.mean([fid.fid_from_features(*draw()) for _ in range(1500)])
    assert expected > closed_form + 0.01  # the bias the interval's target keeps (documented)
    covered = 0
    for rep in range(reps):
        lo, hi = fid.fid_interval(*draw(), n_boot=200, seed=rep)
        covered += lo <= expected <= hi
    # near the floor (true distance 0) the bootstrap spread, taken at theta > 0, is wider than the real one:
    # conservative there (documented in fid_interval), near nominal elsewhere
    assert 0.89 <= covered / reps <= (1.0 if closed_form == 0 else 0.99), covered / reps


def test_kid_is_unbiased_mmd_with_cubic_kernel():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 6)), rng.normal(size=(60, 6)) + 0.5
    k = lambda a, b: (a @ b.T / a.shape[1] + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (60 * 59) - 2 * kxy.mean()
    value, std = fid.kid(x, y, n_subsets=3, subset_size=60)  # a subset of all 60 is the whole set
    assert value == pytest.approx(mmd, rel=1e-9) and std == pytest.approx(0.0, abs=1e-12)
    same = fid.kid(rng.normal(size=(400, 6)), rng.normal(size=(400, 6)), n_subsets=20, subset_size=200)
    assert abs(same[0]) < 3 * same[1] + 1e-3 and value > 10 * abs(same[0])
    with pytest.raises(ValueError, match="same D"):
        fid.kid(x, y[:, :3])


def test_kid_dense_path_matches_torchmetrics_subset_by_subset(monkeypatch):
    """The kernel matrices formed once give every subset's MMD^2 as torchmetrics' per-subset loop does."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(90, 5)), rng.normal(size=(70, 5)) + 0.3
    dense = fid.kid(x, y, n_subsets=7, subset_size=40, seed=5)
    monkeypatch.setattr(fid, "KID_DENSE_MAX", 0)  # every subset through torchmetrics
    loop = fid.kid(x, y, n_subsets=7, subset_size=40, seed=5)
    assert dense == pytest.approx(loop, rel=1e-9) and dense[1] > 0


def test_fid_infinity_removes_most_of_the_c_over_n_bias():
    """Gaussians (D = 32, as the digits ruler): the plug-in FID at N = 400 sits ~c/N above its N -> inf value
    (the target: N = 40,000 against the same reference); FID-infinity's mean over 6 draws is within a
    quarter of that bias of it, and its line predicts the plug-in at N."""
    from ddpm.metrics.fid import fid_infinity

    rng = np.random.default_rng(1)
    d = 32
    a_, b_ = rng.normal(size=(2, d, d)) / np.sqrt(d)
    l1, l2 = np.linalg.cholesky(a_ @ a_.T + 0.5 * np.eye(d)), np.linalg.cholesky(b_ @ b_.T + 0.5 * np.eye(d))
    ref = rng.normal(size=(1347, d)) @ l2.T
    target = fid_from_features(rng.normal(size=(40_000, d)) @ l1.T + 0.15, ref)
    plug, inf = [], []
    for _ in range(6):
        x = rng.normal(size=(400, d)) @ l1.T + 0.15
        plug.append(fid_from_features(x, ref))
        icpt, slope = fid_infinity(x, ref)
        inf.append(icpt)
        assert slope > 0 and abs(icpt + slope / 400 - plug[-1]) < 0.25 * (plug[-1] - icpt)
    bias = np.mean(plug) - target
    assert bias > 0.5  # the c/N bias is there to remove (~1.0 here)
    assert abs(np.mean(inf) - target) < 0.25 * bias
    assert fid_infinity(x, ref) == fid_infinity(x, ref)  # seeded
    assert np.isnan(fid_infinity(x[:34], ref)[0])  # N too small for D: no fit


def _classes(rng, d=8, k=10):
    """Class means and a shared covariance factor: a digits-like mixture whose class mix weighs on FID."""
    return rng.normal(size=(k, d)) * 3.0, rng.normal(size=(d, d)) / np.sqrt(d) + 0.3 * np.eye(d)


def _draw(rng, means, factor, counts):
    return np.concatenate([mu + rng.normal(size=(c, len(mu))) @ factor.T for mu, c in zip(means, counts)])


def test_the_floor_is_what_iid_draws_score_even_from_a_stratified_split():
    """perfect_model_fid against the Monte Carlo mean of n i.i.d. draws (multinomial class counts) against the same
    reference: within 15% below and above the held-out size, where the stratified held-out set's own plug-in
    (the floor before) is less than half of it."""
    from ddpm.metrics.fid import perfect_model_fid

    rng = np.random.default_rng(0)
    means, factor = _classes(rng)
    ref, held = _draw(rng, means, factor, [100] * 10), _draw(rng, means, factor, [40] * 10)  # stratified splits
    for n in (200, 2000):
        truth = np.mean([fid_from_features(_draw(rng, means, factor, rng.multinomial(n, [0.1] * 10)), ref)
                         for _ in range(200)])
        floor = perfect_model_fid(held, ref, n)
        assert floor["fid"] == pytest.approx(truth, rel=0.15)
        assert floor["lo"] <= truth <= floor["hi"] and floor["fid"] == floor["inf"] + floor["slope"] / n
    assert fid_from_features(held, ref) < 0.5 * perfect_model_fid(held, ref, len(held))["fid"]


def test_the_floor_is_positive_falls_with_n_and_refuses_too_few_held_out_features():
    from ddpm.metrics.fid import perfect_model_fid

    rng = np.random.default_rng(1)
    ref, held = rng.normal(size=(1347, 8)), rng.normal(size=(449, 8))
    floors = [perfect_model_fid(held, ref, n) for n in (100, 449, 2000, 10**9)]
    assert all(0.0 < f["lo"] <= f["fid"] <= f["hi"] for f in floors[:3])
    assert [f["fid"] for f in floors] == sorted((f["fid"] for f in floors), reverse=True)
    assert floors[-1]["fid"] == pytest.approx(floors[0]["inf"], rel=1e-3) and floors[0]["inf"] > 0
    assert perfect_model_fid(held, ref, 449) == perfect_model_fid(held, ref, 449)  # seeded
    with pytest.raises(ValueError, match="at least 28 held-out features for D = 8.*got 27"):
        perfect_model_fid(held[:27], ref, 2000)
    with pytest.raises(ValueError, match="n must be an int >= 2.*got 1.5"):
        perfect_model_fid(held, ref, 1.5)


def test_the_stage_floor_takes_fid_from_the_perfect_model_and_the_rest_from_min_n_m_held_out_images():
    from ddpm.metrics.fid import perfect_model_fid
    from stages.fid import floor_at, measure

    rng = np.random.default_rng(0)
    ref, held = rng.normal(size=(1347, 8)), rng.normal(size=(449, 8)) * 1.05
    for n in (400, 2000):
        floor, real = floor_at(held, ref, n)
        pm, direct = perfect_model_fid(held, ref, n), measure(held[:min(n, 449)], ref)
        assert real == 449 and (floor["fid"], floor["fid_lo"], floor["fid_hi"], floor["fid_inf"]) == (
            pm["fid"], pm["lo"], pm["hi"], pm["inf"])
        assert floor["kid"] == direct["kid"] and floor["precision"] == direct["precision"]
    with pytest.raises(SystemExit, match="sample.n_samples=2000: the floor needs at least 28 held-out features"):
        floor_at(held[:9], ref, 2000)
