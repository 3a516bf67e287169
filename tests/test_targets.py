"""Label smoothing and timm-style MixUp/CutMix (softnce.targets) against hand-computed numpy cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softnce import targets as T

RECIPE = dict(label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5)


def _images(n=6, h=7, w=5, c=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, h, w, c))


_jit_mix = jax.jit(T.mix_batch, static_argnames=("num_classes", "config"))
_jit_apply = jax.jit(T.apply_mix, static_argnames=("num_classes", "config"))


def _mix(rng_seed, x, y, num_classes, **cfg):
    return _jit_mix(jax.random.key(rng_seed), x, y, num_classes=num_classes, config=T.MixConfig(**cfg))


def _params(lam, use_cutmix=False, cy=0, cx=0, n=None):
    n = n or len(np.atleast_1d(lam))
    def b(v, dt):
        return jnp.broadcast_to(jnp.asarray(v, dt), (n,))

    return T.MixParams(b(lam, jnp.float32), b(use_cutmix, bool), b(cy, jnp.int32), b(cx, jnp.int32))


def _smooth_np(labels, c, e):
    return np.eye(c)[labels] * (1 - e) + e / c


def test_label_smoothing_values_and_no_mixing():
    x, y = _images(), jnp.array([0, 2, 1, 3, 3, 0])
    mixed, t = _mix(0, x, y, 4, label_smoothing=0.1)
    # timm: on = 1 - e + e / C = 0.925, off = e / C = 0.025.
    np.testing.assert_allclose(t.dense[0], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)
    np.testing.assert_allclose(t.dense[1], [0.025, 0.025, 0.925, 0.025], rtol=1e-6)
    np.testing.assert_allclose(t.dense.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(mixed, x)
    np.testing.assert_array_equal(t.labels, y)
    assert t.structured is None
    # Mixing off and e = 0: exactly one_hot(labels); odd batch sizes are fine without mixing.
    _, t0 = _mix(0, x[:5], y[:5], 4)
    np.testing.assert_array_equal(t0.dense, np.eye(4)[np.asarray(y[:5])])


def test_batch_mode_mixup_pairs_i_with_reversed_partner():
    x, y = _images(), jnp.array([0, 2, 1, 3, 3, 0])
    cfg = T.MixConfig(label_smoothing=0.1, mixup_alpha=1.0)
    mixed, t = _jit_apply(x, y, _params(0.7, n=6), num_classes=4, config=cfg)
    xn, smooth = np.asarray(x, np.float64), _smooth_np(np.asarray(y), 4, 0.1)
    np.testing.assert_allclose(mixed, 0.7 * xn + 0.3 * xn[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t.dense, 0.7 * smooth + 0.3 * smooth[::-1], rtol=1e-5)
    np.testing.assert_allclose(t.dense.sum(1), 1.0, rtol=1e-6)


def test_lambda_half_mixup_gives_partners_identical_targets():
    """docs/method.md property 8: with lambda = 0.5 a sample and its partner have the same target."""
    y = jnp.array([0, 1, 2, 3, 4, 5])
    cfg = T.MixConfig(label_smoothing=0.1, mixup_alpha=0.8)
    _, t = _jit_apply(_images(), y, _params(0.5, n=6), num_classes=6, config=cfg)
    np.testing.assert_array_equal(t.dense, t.dense[::-1])
    assert not np.allclose(t.dense[0], t.dense[1])


@pytest.mark.parametrize(
    "lam, cy, cx, box, corrected",
    [
        # cut = floor(10 * sqrt(0.25)) = 5, half 2: y [1-2, 1+2) -> [0, 3), x [8-2, 8+2) -> [6, 10).
        (0.75, 1, 8, (0, 3, 6, 10), 1 - 12 / 100),
        # lam 0: cut = 10, half 5, centre (5, 5): the whole image.
        (0.0, 5, 5, (0, 10, 0, 10), 0.0),
        # lam 0, corner centre: [0, 5) x [0, 5), a quarter.
        (0.0, 0, 0, (0, 5, 0, 5), 0.75),
        # lam 1: empty box, nothing is cut.
        (1.0, 4, 4, (4, 4, 4, 4), 1.0),
    ],
)
def test_cutmix_box_and_corrected_lambda(lam, cy, cx, box, corrected):
    got = T.cutmix_box(jnp.array([lam]), jnp.array([cy]), jnp.array([cx]), 10, 10)
    assert tuple(int(b[0]) for b in got) == box
    np.testing.assert_allclose(T.box_lambda(got, 10, 10), [corrected], rtol=1e-6)


def test_cutmix_pixels_come_from_partner_exactly_inside_per_element_boxes():
    n, h, w = 6, 7, 5
    x, y = _images(n, h, w), jnp.array([0, 1, 2, 3, 4, 5])
    lam = jnp.array([0.3, 0.75, 0.5, 0.9, 1.0, 0.1])
    cy, cx = jnp.array([3, 0, 6, 2, 3, 1]), jnp.array([2, 4, 0, 2, 1, 3])
    cfg = T.MixConfig(cutmix_alpha=1.0, mode="elem", structured=True)
    mixed, t = _jit_apply(x, y, T.MixParams(lam, jnp.ones(n, bool), cy, cx), num_classes=n, config=cfg)
    xn, expected, lam_ref = np.asarray(x), np.array(x), np.zeros(n)
    for i in range(n):  # numpy re-implementation of timm's rand_bbox with the same draws
        half_h, half_w = int(h * np.sqrt(1 - float(lam[i]))) // 2, int(w * np.sqrt(1 - float(lam[i]))) // 2
        yl, yh = np.clip([cy[i] - half_h, cy[i] + half_h], 0, h)
        xl, xh = np.clip([cx[i] - half_w, cx[i] + half_w], 0, w)
        expected[i, yl:yh, xl:xh] = xn[n - 1 - i, yl:yh, xl:xh]
        lam_ref[i] = 1 - (yh - yl) * (xh - xl) / (h * w)
    np.testing.assert_array_equal(mixed, expected)
    onehot = np.eye(n)
    np.testing.assert_allclose(t.dense, lam_ref[:, None] * onehot + (1 - lam_ref[:, None]) * onehot[::-1], atol=1e-6)
    assert len(set(np.round(lam_ref, 6))) > 3  # the boxes really differ per element


def test_pair_mode_shares_lambda_and_box_and_swaps_patches():
    x, y, mixed, t = _recipe_mix("pair")
    n, xn, mixed = x.shape[0], np.asarray(x, np.float64), np.asarray(mixed, np.float64)
    lam = np.asarray(t.structured.weights[:, 0]) / 0.9  # weight of the own label is lam (1 - e)
    np.testing.assert_array_equal(lam, lam[::-1])
    kinds = set()
    for i in range(n // 2):
        j = n - 1 - i
        from_partner = np.isclose(mixed[[i, j]], xn[[j, i]]).all(-1)  # [2, H, W]
        if (np.isclose(mixed[[i, j]], xn[[i, j]]).all(-1) | from_partner).all():  # CutMix: same box
            kinds.add("cutmix")
            np.testing.assert_array_equal(from_partner[0], from_partner[1])
            np.testing.assert_allclose(lam[i], 1 - from_partner[0].mean(), atol=1e-6)
        else:  # MixUp with the shared lambda
            kinds.add("mixup")
            np.testing.assert_allclose(mixed[i], lam[i] * xn[i] + (1 - lam[i]) * xn[j], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(mixed[j], lam[i] * xn[j] + (1 - lam[i]) * xn[i], rtol=1e-5, atol=1e-5)
    assert kinds == {"cutmix", "mixup"}
    assert len(set(lam[: n // 2].tolist())) == n // 2


def test_mix_prob_zero_leaves_inputs_unchanged():
    x, y = _images(), jnp.array([0, 2, 1, 3, 3, 0])
    for mode in T.MODES:
        mixed, t = _mix(1, x, y, 4, **{**RECIPE, "mix_prob": 0.0, "mode": mode})
        np.testing.assert_array_equal(mixed, x)
        np.testing.assert_allclose(t.dense, _smooth_np(np.asarray(y), 4, 0.1), rtol=1e-6)


def _lam_from_targets(t):
    return np.asarray(t.structured.weights[:, 0])


@pytest.mark.parametrize("switch_prob", [0.0, 1.0])
def test_switch_prob_selects_mixup_or_cutmix(switch_prob):
    n = 16
    x, y = _images(n, 8, 8), jnp.arange(n)
    mix = dict(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob, mode="elem", structured=True)
    mixed, t = _mix(5, x, y, n, **mix)
    xn, lam = np.asarray(x, np.float64), _lam_from_targets(t)[:, None, None, None]
    from_self, from_partner = np.isclose(mixed, xn), np.isclose(mixed, xn[::-1])
    if switch_prob == 0.0:  # MixUp: every pixel is the blend
        np.testing.assert_allclose(mixed, lam * xn + (1 - lam) * xn[::-1], rtol=1e-5, atol=1e-5)
        assert not (from_self | from_partner).all()
    else:  # CutMix: every pixel is copied from self or partner, partner share = 1 - lam
        assert (from_self | from_partner).all()
        np.testing.assert_allclose(from_partner.mean((1, 2, 3)), 1 - lam[:, 0, 0, 0], atol=1e-6)


@functools.lru_cache(maxsize=None)
def _recipe_mix(mode):
    """The reference recipe (structured) on 8 images of 6x6, compiled once per mode."""
    x, y = _images(8, 6, 6), jnp.array([0, 4, 1, 3, 3, 0, 2, 4])
    return (x, y) + _mix(2, x, y, 5, **RECIPE, mode=mode, structured=True)


def test_structured_equals_dense_in_every_mode_and_jits():
    for mode in T.MODES:
        x, y, mixed, t = _recipe_mix(mode)
        assert mixed.shape == x.shape and mixed.dtype == x.dtype
        assert t.dense.shape == (8, 5) and t.dense.dtype == jnp.float32 and t.labels.dtype == jnp.int32
        assert t.structured.class_ids.shape == (8, 2) and t.structured.uniform.shape == (8,)
        np.testing.assert_allclose(T.to_dense(t.structured, 5), t.dense, atol=1e-6)
        np.testing.assert_allclose(t.dense.sum(1), 1.0, rtol=1e-5)
        assert (np.asarray(t.dense) >= 0).all()


def test_mixup_on_vectors_and_config_from_configdict():
    ml_collections = pytest.importorskip("ml_collections")  # the trainer's configs (softnce[train])
    x, y = jax.random.normal(jax.random.key(0), (6, 3)), jnp.array([0, 1, 2, 0, 1, 2])
    cd = ml_collections.ConfigDict(dict(mixup_alpha=0.8, label_smoothing=0.1, mode="elem", unrelated=3))
    cfg = T.MixConfig.from_config(cd)
    assert cfg == T.MixConfig(label_smoothing=0.1, mixup_alpha=0.8, mode="elem")
    cd.structured = True
    mixed, t = jax.jit(lambda r, x, y: T.mix_batch(r, x, y, num_classes=3, config=cd))(jax.random.key(1), x, y)
    lam = _lam_from_targets(t)[:, None] / 0.9  # weight of the own label is lam (1 - e)
    assert len(set(lam[:, 0].tolist())) == 6
    np.testing.assert_allclose(mixed, lam * np.asarray(x) + (1 - lam) * np.asarray(x)[::-1], rtol=1e-5, atol=1e-6)


def test_errors():
    x, y = _images(), jnp.array([0, 2, 1, 3, 3, 0])
    with pytest.raises(ValueError, match="even batch size"):
        _mix(0, x[:5], y[:5], 4, mixup_alpha=1.0)
    with pytest.raises(ValueError, match="CutMix cuts boxes out of images"):
        _mix(0, x.reshape(6, -1), y, 4, cutmix_alpha=1.0)
    with pytest.raises(ValueError, match="labels must be integer"):
        _mix(0, x, y[:4], 4, mixup_alpha=1.0)
    with pytest.raises(ValueError, match="labels must be integer"):
        _mix(0, x, y.astype(jnp.float32), 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        T.MixConfig(mode="pairs")
    config_rule = r"augment.label_smoothing = 1.0 is out of range: must be a number in \[0, 1\)"  # config_checks.RULES
    with pytest.raises(ValueError, match=config_rule):
        T.MixConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="mix_prob"):
        T.MixConfig(mix_prob=1.5)
    with pytest.raises(ValueError, match="mixup_alpha"):
        T.MixConfig(mixup_alpha=-0.1)


def test_lambda_statistics_match_beta_and_mix_prob():
    """Per-element MixUp lambdas: mean and variance of Beta(a, a), share of unmixed = 1 - mix_prob.

    About 0.7 * 8192 = 5734 mixed draws of Beta(0.8, 0.8): variance 1 / (4 (2a + 1)) = 0.0962, so
    the standard error of the mean is sqrt(0.0962 / 5734) = 0.0041 and a 5 standard-error tolerance
    (0.02) makes a false failure practically impossible (fixed key anyway) while a wrong alpha
    (e.g. variance of Beta(1, 1) = 0.0833) or a shifted lambda is caught. For the variance the
    standard error is about sqrt((m4 - var^2) / n) < 0.0012; tolerance 0.006 (5 of them).
    """
    n, a, p = 8192, 0.8, 0.7
    x, y = jnp.zeros((n, 1)), jnp.zeros((n,), jnp.int32)
    _, t = _mix(11, x, y, 1, mixup_alpha=a, mix_prob=p, mode="elem", structured=True)
    lam = _lam_from_targets(t)
    unmixed = lam == 1.0  # a Beta draw of exactly 1 has probability ~0
    assert abs(unmixed.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)  # binomial standard error
    lam = lam[~unmixed]
    assert abs(lam.mean() - 0.5) < 0.02
    assert abs(lam.var() - 1 / (4 * (2 * a + 1))) < 0.006


def test_per_device_mixing_under_shard_map():
    """Inside jax.shard_map each device mixes its own shard with its own key (as the trainer does)."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    x, y = _images(16, 4, 4), jnp.arange(16) % 5
    cfg = T.MixConfig(**RECIPE, mode="elem", structured=True)

    def per_device(rng, x, y):
        rng = jax.random.fold_in(rng, jax.lax.axis_index("data"))
        return T.mix_batch(rng, x, y, num_classes=5, config=cfg)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P("data")))
    mixed, t = sharded(jax.random.key(3), x, y)
    mixed, t = np.asarray(mixed), jax.tree.map(np.asarray, t)
    for d in range(8):  # device d holds rows 2d, 2d + 1, mixed with each other
        rows = slice(2 * d, 2 * d + 2)
        xd, yd = np.asarray(x[rows], np.float64), np.asarray(y[rows])
        lam = t.structured.weights[rows, 0] / 0.9
        onehot = _smooth_np(yd, 5, 0.1)
        np.testing.assert_allclose(t.dense[rows], lam[:, None] * onehot + (1 - lam[:, None]) * onehot[::-1], atol=1e-6)
        np.testing.assert_array_equal(t.labels[rows], yd)
        for i, j in ((0, 1), (1, 0)):  # each element: MixUp blend or CutMix box from its partner
            out = mixed[2 * d + i]
            is_mixup = np.allclose(out, lam[i] * xd[i] + (1 - lam[i]) * xd[j], atol=1e-5)
            from_partner = np.isclose(out, xd[j]).all(-1)
            is_cutmix = (np.isclose(out, xd[i]).all(-1) | from_partner).all() and np.isclose(
                from_partner.mean(), 1 - lam[i], atol=1e-6
            )
            assert is_mixup or is_cutmix, (d, i)
    assert len(set(np.round(t.structured.weights[:, 0], 6))) > 8  # devices draw different lambdas


# --------------------------------------------------------------------------------------------------
# timm's cutmix_minmax and correct_lam; soft targets given with the data.
# --------------------------------------------------------------------------------------------------


def test_cutmix_minmax_forces_alpha_one_and_is_checked():
    cfg = T.MixConfig(cutmix_alpha=0.0, cutmix_minmax=[0.2, 0.8], correct_lam=False)  # a list, as JSON gives it
    assert cfg.cutmix_alpha == 1.0 and cfg.cutmix_minmax == (0.2, 0.8) and cfg.mixing  # timm: alpha forced to 1
    assert hash(cfg) == hash(T.MixConfig(cutmix_alpha=1.0, cutmix_minmax=(0.2, 0.8), correct_lam=False))
    with pytest.raises(ValueError, match=r"lo < hi"):
        T.MixConfig(cutmix_minmax=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"cutmix_minmax must be \(lo, hi\)"):
        T.MixConfig(cutmix_minmax=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match=r"augment.cutmix_minmax = 1.5 is out of range"):
        T.MixConfig(cutmix_minmax=(0.1, 1.5))


def test_cutmix_minmax_boxes_against_rand_bbox_minmax_with_the_same_draws():
    """apply_mix with given (corner, side) draws: the numpy box of timm's rand_bbox_minmax, lam = kept area."""
    n, h, w = 6, 7, 5
    x, y = _images(n, h, w), jnp.arange(n)
    top, left = jnp.array([0, 3, 1, 0, 5, 2]), jnp.array([0, 1, 2, 3, 0, 1])
    cut_h, cut_w = jnp.array([2, 4, 3, 7, 1, 5]), jnp.array([1, 4, 3, 2, 5, 0])
    cfg = T.MixConfig(cutmix_minmax=(0.1, 0.9), mode="elem", correct_lam=False)  # correct_lam forced on anyway
    params = T.MixParams(jnp.full(n, 0.9), jnp.ones(n, bool), top, left, cut_h, cut_w)
    mixed, t = _jit_apply(x, y, params, num_classes=n, config=cfg)
    xn, expected, lam_ref = np.asarray(x), np.array(x), np.zeros(n)
    for i in range(n):
        yl, xl = int(top[i]), int(left[i])
        yu, xu = yl + int(cut_h[i]), xl + int(cut_w[i])  # rand_bbox_minmax: yu = yl + cut_h, no clipping
        expected[i, yl:yu, xl:xu] = xn[n - 1 - i, yl:yu, xl:xu]
        lam_ref[i] = 1 - (yu - yl) * (xu - xl) / (h * w)
    np.testing.assert_array_equal(mixed, expected)
    onehot = np.eye(n)
    np.testing.assert_allclose(t.dense, lam_ref[:, None] * onehot + (1 - lam_ref[:, None]) * onehot[::-1], atol=1e-6)


def test_cutmix_minmax_draws_sides_uniformly_in_the_range_and_boxes_inside_the_image():
    """mix_batch's draws: sides uniform over [floor(H lo), floor(H hi)) (numpy randint's range), the box
    inside the image with a uniform corner, the partner's pixels exactly in it, lam the kept area."""
    n, h, w, lo, hi = 512, 10, 16, 0.2, 0.7
    x, y = _images(n, h, w, c=1, seed=4), jnp.arange(n) % 7
    mixed, t = _mix(9, x, y, 7, cutmix_minmax=(lo, hi), mode="elem", structured=True)
    partner = np.isclose(np.asarray(mixed), np.asarray(x)[::-1]).all(-1)  # [n, H, W]
    own = np.isclose(np.asarray(mixed), np.asarray(x)).all(-1)
    assert (partner | own).all()  # CutMix only (mixup_alpha = 0): every pixel is copied
    rows, cols = partner.any(2), partner.any(1)
    sides_h, sides_w = rows.sum(1), cols.sum(1)
    # The partner's pixels form one full rectangle of those sides.
    np.testing.assert_array_equal(partner.sum((1, 2)), sides_h * sides_w)
    assert set(sides_h.tolist()) == set(range(int(h * lo), int(h * hi)))  # {2, ..., 6}
    assert set(sides_w.tolist()) == set(range(int(w * lo), int(w * hi)))  # {3, ..., 11}
    counts = np.bincount(sides_h)[int(h * lo):]
    assert counts.min() > 0.6 * n / len(counts)  # roughly uniform (about 102 each)
    first_row = np.argmax(rows, axis=1)
    # timm draws the corner with numpy's randint(0, H - cut_h), whose upper end is excluded: the box
    # starts on the first row for some draws but never reaches the last one.
    assert first_row.min() == 0 and (first_row + sides_h).max() == h - 1
    lam = np.asarray(t.structured.weights[:, 0])
    np.testing.assert_allclose(lam, 1 - sides_h * sides_w / (h * w), atol=1e-6)  # corrected (forced)


def test_correct_lam_false_keeps_the_drawn_lambda_for_clipped_boxes():
    x, y = _images(2, 10, 10), jnp.array([0, 1])
    params = _params(0.0, use_cutmix=True, cy=0, cx=0, n=2)  # cut 10 around (0, 0): clipped to [0, 5) x [0, 5)
    for correct_lam, lam in ((True, 0.75), (False, 0.0)):  # timm: 1 - 25 / 100 vs the drawn lambda
        cfg = T.MixConfig(cutmix_alpha=1.0, correct_lam=correct_lam, structured=True)
        mixed, t = _jit_apply(x, y, params, num_classes=2, config=cfg)
        np.testing.assert_array_equal(np.asarray(mixed)[0, :5, :5], np.asarray(x)[1, :5, :5])
        np.testing.assert_array_equal(np.asarray(mixed)[0, 5:], np.asarray(x)[0, 5:])
        np.testing.assert_allclose(t.dense[0], [lam, 1 - lam], atol=1e-6)
        np.testing.assert_allclose(T.to_dense(t.structured, 2), t.dense, atol=1e-6)


def test_given_soft_targets_are_smoothed_then_mixed_like_one_hots():
    x, y = _images(), jnp.array([0, 2, 1, 3, 3, 0])
    soft = jax.nn.softmax(jax.random.normal(jax.random.key(7), (6, 4)), axis=-1)
    cfg = T.MixConfig(label_smoothing=0.1, mixup_alpha=1.0, structured=True)
    mixed, t = _jit_apply(x, y, _params(0.7, n=6), num_classes=4, config=cfg, soft_targets=soft)
    smooth = 0.9 * np.asarray(soft, np.float64) + 0.1 / 4
    np.testing.assert_allclose(t.dense, 0.7 * smooth + 0.3 * smooth[::-1], rtol=1e-5)
    np.testing.assert_allclose(mixed, 0.7 * np.asarray(x) + 0.3 * np.asarray(x)[::-1], rtol=1e-5, atol=1e-6)
    assert t.structured is None  # arbitrary soft targets have no structured form
    np.testing.assert_array_equal(t.labels, y)
    # No mixing and no smoothing: the given targets themselves; shape errors name the expected shape.
    _, t0 = T.mix_batch(jax.random.key(0), x, y, num_classes=4, config=T.MixConfig(), soft_targets=soft)
    np.testing.assert_array_equal(t0.dense, soft)
    with pytest.raises(ValueError, match=r"soft_targets must be \[N, C\] = \(6, 4\)"):
        T.mix_batch(jax.random.key(0), x, y, num_classes=4, config=T.MixConfig(), soft_targets=soft[:, :3])
