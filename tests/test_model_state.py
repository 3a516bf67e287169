"""Models with state (BatchNorm's ``batch_stats``): the sharded step averages the per-device updates,
the state is checkpointed and resumed exactly, and evaluation, ``softnce.inference`` and the export use
it. The ResNets (softnce.models.resnet) train through the trainer on the 8x8 digits."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from test_train import small_config

from softnce import (
    assembly,
    checkpointing,
    distributed,
    export,
    export_loader,
    inference,
    losses,
    models,
    steps,
    targets,
    train,
)
from softnce.data import get_dataset
from softnce.models import resnet


def resnet_config(**overrides):
    config = small_config(**{"loss.name": "soft_target_cross_entropy", "augment.cutmix_alpha": 0.0, **overrides})
    config.model = ml_collections.ConfigDict(dict(name="resnet18", width=4, small_images=True))
    return config


def test_the_resnets_have_the_reference_sizes():
    def count(factory, **fields):
        model = factory(1000, **fields)
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])), sorted(shapes)

    assert count(resnet.resnet18) == (11_689_512, ["batch_stats", "params"])  # torchvision's resnet18
    assert count(resnet.resnet50) == (25_557_032, ["batch_stats", "params"])  # torchvision's resnet50
    small = resnet.resnet18(100, small_images=True)
    logits = small.apply(small.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=False),
                         jnp.ones((2, 32, 32, 3)), train=False)
    assert logits.shape == (2, 100) and logits.dtype == jnp.float32


def test_the_sharded_step_averages_the_per_device_statistics():
    """One step on 8 devices: batch_stats = the mean over devices of each device's BatchNorm update."""
    model = resnet.resnet18(10, width=4, small_images=True)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 8, 8, 1)) * 2 + 1, jnp.float32)
    labels = jnp.arange(64) % 10
    variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
    per_device = [model.apply(variables, x[8 * d:8 * (d + 1)], train=True, mutable=["batch_stats"])[1]
                  for d in range(8)]
    whole = model.apply(variables, x, train=True, mutable=["batch_stats"])[1]  # not the statistics of one batch of 64
    variables = jax.tree.map(jnp.copy, variables)  # the step donates the state's buffers
    params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
    state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.0), model_state=model_state)
    mesh = distributed.make_mesh()
    step = steps.make_sharded_train_step(
        mesh, loss_fn=losses.get_loss("soft_target_cross_entropy").fn, num_classes=10,
        mix_config=targets.MixConfig(), temperature=1.0)
    batch = distributed.global_batch(mesh, {"inputs": np.asarray(x), "label": np.asarray(labels)})
    new_state, _ = step(jax.device_put(state, distributed.replicated(mesh)), batch, jax.random.PRNGKey(1), None)

    expected = jax.tree.map(lambda *u: np.mean(np.stack(u), axis=0), *per_device)
    got = jax.device_get(new_state.model_state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)
    var = lambda tree: np.concatenate([np.ravel(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)  # noqa: E731
                                       if "var" in jax.tree_util.keystr(p)])
    assert np.abs(var(got["batch_stats"]) - var(whole["batch_stats"])).max() > 1e-4


def test_a_resnet_trains_resumes_exactly_and_is_used_with_its_statistics(tmp_path):
    config = resnet_config()
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    train.train_and_evaluate(resnet_config(), str(tmp_path / "resumed"), stop_at_step=8)
    resumed = train.train_and_evaluate(resnet_config(), str(tmp_path / "resumed"))
    assert resumed["step"] == whole["step"] == 12 and resumed["top1"] == whole["top1"]

    dataset = get_dataset(config.data)
    model = models.get_model(config.model, dataset.num_classes)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = assembly.abstract_variables(model, dataset.example_shape, device)
    saved = {name: checkpointing.restore_variables_only(tmp_path / name / "checkpoints", 12, target)
             for name in ("whole", "resumed")}
    assert sorted(saved["whole"]) == ["batch_stats", "params"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), saved["resumed"], saved["whole"])
    initial = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *dataset.example_shape)), train=False)["batch_stats"]
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), saved["whole"]["batch_stats"],
                         initial)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the running statistics were trained

    # Evaluation, the loaded classifier and the export all use the trained running statistics.
    classifier = inference.load(str(tmp_path / "whole"))
    batch = next(dataset.eval_batches(64))
    expected = np.asarray(model.apply(saved["whole"], batch["inputs"], train=False))
    np.testing.assert_allclose(classifier.logits(batch["inputs"]), expected, rtol=1e-5, atol=1e-5)
    fresh_stats = model.apply({**saved["whole"], "batch_stats": initial}, batch["inputs"], train=False)
    assert np.abs(np.asarray(fresh_stats) - expected).max() > 1e-3  # so the statistics matter
    mask = np.asarray(batch["mask"])
    top1 = float((expected.argmax(1) == np.asarray(batch["label"]))[mask].mean())
    assert top1 == pytest.approx(float((classifier.predict(batch["inputs"]) == batch["label"])[mask].mean()))
    export.export_classifier(classifier, tmp_path / "export")
    exported = export_loader.load(str(tmp_path / "export"))
    np.testing.assert_allclose(exported.logits(batch["inputs"]), expected, rtol=1e-5, atol=1e-5)
    assert sorted(exported.variables) == ["batch_stats", "params"]


def test_an_nnx_model_trains_resumes_exactly_and_is_used_like_a_linen_one(tmp_path, user_module):
    """tests/user_registrations.py's NNX model (BatchNorm, Dropout, a list of layers) through the trainer."""
    def config():
        c = small_config(**{"loss.name": "soft_target_cross_entropy", "augment.cutmix_alpha": 0.0})
        c.model = ml_collections.ConfigDict(dict(name="user_nnx", width=16, dropout_rate=0.2))
        return c

    whole = train.train_and_evaluate(config(), str(tmp_path / "whole"))
    train.train_and_evaluate(config(), str(tmp_path / "resumed"), stop_at_step=8)
    resumed = train.train_and_evaluate(config(), str(tmp_path / "resumed"))
    assert resumed["nll"] == whole["nll"] and np.isfinite(whole["nll"]) and whole["top1"] > 0.15  # chance: 0.1

    classifier = inference.load(str(tmp_path / "whole"))
    again = inference.load(str(tmp_path / "resumed"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), again.variables,
                 classifier.variables)
    assert sorted(classifier.variables) == ["batch_stats", "params"]
    assert sorted(classifier.variables["params"]["layers"]) == ["0", "1"]  # string keys: the export takes them

    # The classifier is the NNX module itself, in evaluation mode, with the trained state.
    dataset = get_dataset(config().data)
    batch = next(dataset.eval_batches(64))
    module = user_module.NNXNet(10, rngs=nnx.Rngs(0), width=16, dropout_rate=0.2)
    for collection, variable_type in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        state = nnx.state(module, variable_type)
        pure = jax.tree.map(np.asarray, classifier.variables[collection])
        pure = {k: ({int(i): v for i, v in sub.items()} if k == "layers" else sub) for k, sub in pure.items()}
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(module, state)
    module.eval()
    expected = np.asarray(module(jnp.asarray(batch["inputs"])))
    np.testing.assert_allclose(classifier.logits(batch["inputs"]), expected, rtol=1e-5, atol=1e-5)
    export.export_classifier(classifier, tmp_path / "export")
    np.testing.assert_allclose(export_loader.load(str(tmp_path / "export")).logits(batch["inputs"]), expected,
                               rtol=1e-5, atol=1e-5)


def test_batchnorm_over_the_data_axis_normalises_with_the_global_batch():
    """A BatchNorm with axis_name='data' (the mesh axis) computes the statistics of the whole global batch."""
    import flax.linen as nn

    class SyncNorm(nn.Module):
        num_classes: int = 3

        @nn.compact
        def __call__(self, x, *, train: bool):
            x = nn.BatchNorm(use_running_average=not train, momentum=0.5, axis_name="data" if train else None)(x)
            return nn.Dense(self.num_classes)(x)

    model = SyncNorm()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 5)) * 3 + 2, jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
    expected = nn.BatchNorm(use_running_average=False, momentum=0.5).apply(  # the statistics of all 64 examples
        {"params": variables["params"]["BatchNorm_0"], "batch_stats": variables["batch_stats"]["BatchNorm_0"]},
        x, mutable=["batch_stats"])[1]["batch_stats"]
    variables = jax.tree.map(jnp.copy, variables)
    state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.0),
                                    model_state={"batch_stats": variables["batch_stats"]})
    mesh = distributed.make_mesh()
    step = steps.make_sharded_train_step(mesh, loss_fn=losses.get_loss("soft_target_cross_entropy").fn, num_classes=3,
                                         mix_config=targets.MixConfig(), temperature=1.0)
    batch = distributed.global_batch(mesh, {"inputs": np.asarray(x), "label": np.arange(64) % 3})
    new_state, _ = step(jax.device_put(state, distributed.replicated(mesh)), batch, jax.random.PRNGKey(1), None)
    got = jax.device_get(new_state.model_state["batch_stats"]["BatchNorm_0"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)
