"""One registry pattern for losses, models and datasets (softnce.registry), and users' own entries."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_train import REPO, small_config

from softnce import losses, optim, steps, targets, train
from softnce.data import DATASETS, get_dataset, register_dataset
from softnce.models import MODELS, get_model, register_model
from softnce.registry import Registry, lazy


def test_register_get_names_and_contains():
    registry = Registry("widget")
    assert registry.register("b", 2) == 2

    @registry.register("a")
    def make_a():
        return "a"

    assert registry.get("a") is make_a and registry.get("b") == 2
    assert registry.names() == ["a", "b"] and list(registry) == ["a", "b"] and len(registry) == 2
    assert "a" in registry and "c" not in registry
    assert registry.unregister("b") == 2 and "b" not in registry


def test_unknown_name_lists_the_valid_names_sorted():
    registry = Registry("widget")
    for name in ("zeta", "alpha", "mid"):
        registry.register(name, object())
    with pytest.raises(ValueError, match=r"^unknown widget 'beta'; valid widgets: alpha, mid, zeta\.$"):
        registry.get("beta")
    valid = "mlp, resnet18, resnet50, small_cnn, vit_b16, vit_tiny"
    with pytest.raises(ValueError, match=rf"unknown model 'resnet'; valid models: {valid}"):
        get_model(ml_collections.ConfigDict({"name": "resnet"}), 10)
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; valid datasets: cifar100, digits, fashion_mnist"):
        get_dataset(ml_collections.ConfigDict({"name": "mnist"}))
    with pytest.raises(ValueError, match=r"unknown loss 'softmax'; valid losses: infonce, nll, soft_distribution"):
        losses.get_loss("softmax")


def test_duplicate_registration_is_an_error_unless_overwrite():
    registry = Registry("widget")
    registry.register("a", 1)
    with pytest.raises(ValueError, match=r"a widget named 'a' is already registered; pass overwrite=True"):
        registry.register("a", 2)
    assert registry.get("a") == 1
    assert registry.register("a", 2, overwrite=True) == 2 and registry.get("a") == 2
    for register, name in ((register_model, "mlp"), (register_dataset, "digits")):
        with pytest.raises(ValueError, match="already registered"):
            register(name, lambda *args, **kwargs: None)
    with pytest.raises(ValueError, match="already registered"):
        losses.register_loss("nll", lambda logits, inputs: logits[:, 0])
    with pytest.raises(ValueError, match="non-empty string"):
        registry.register("", 3)


def test_lazy_imports_on_first_call():
    assert lazy("math:hypot")(3.0, 4.0) == 5.0
    with pytest.raises(ValueError, match="module:attribute"):
        lazy("math.hypot")


def test_datasets_are_not_imported_until_built():
    """Importing the registries and checking a config naming a tfds dataset imports neither tfds nor its module."""
    code = (
        "import sys\n"
        "from softnce import assembly\n"
        "from softnce.configs import vit_finetune\n"
        "assembly.validate_config(vit_finetune.get_config('dataset=cifar100,model=vit_tiny'))\n"
        "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'softnce.data.images') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_user_model_and_dataset_train_without_touching_the_package(tmp_path, user_module):
    assert "user_linear" in MODELS and "user_blobs" in DATASETS
    no_mixing = {"augment.mixup_alpha": 0.0, "augment.cutmix_alpha": 0.0}  # the blobs are vectors, not images
    config = small_config(**{"data.name": "user_blobs", "optim.base_lr": 0.4, **no_mixing})
    config.model = ml_collections.ConfigDict({"name": "user_linear"})
    result = train.train_and_evaluate(config, str(tmp_path))
    built = dict(user_module.CALLS)
    assert built["user_linear"] == {"num_classes": user_module.NUM_CLASSES}
    assert built["user_blobs"] == {"name": "user_blobs", "process_index": 0, "process_count": 1, "num_points": 640}
    assert np.isfinite(result["nll"]) and result["top1"] > 0.8  # 4 well-separated blobs: chance is 0.25
    with pytest.raises(ValueError, match=r"valid models: .*user_linear"):
        get_model(ml_collections.ConfigDict({"name": "user_linar"}), 4)


def test_a_user_model_without_layer_structure_has_none(user_module):
    model = get_model(ml_collections.ConfigDict({"name": "user_linear"}), 4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, user_module.FEATURES)), train=False)["params"]
    assert set(params) == {"head"}
    assert optim.layer_structure(model) is None


def test_a_user_dataset_with_given_soft_targets_trains_with_mixup(tmp_path, user_module):
    """The user's dataset brings soft targets; MixUp mixes them (not one_hot(label)) in the trainer."""
    config = small_config(**{"data.name": "user_soft_blobs", "optim.base_lr": 0.4, "augment.cutmix_alpha": 0.0,
                             "augment.mixup_alpha": 0.8, "augment.mix_prob": 1.0, "augment.label_smoothing": 0.0,
                             "loss.noise": "target_mean"})
    config.model = ml_collections.ConfigDict({"name": "user_linear"})
    result = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(result["nll"]) and result["top1"] > 0.5  # 12 steps on mixed soft targets; chance is 0.25
    dataset = get_dataset(config.data)
    batch = next(dataset.train_batches(16, seed=0))
    np.testing.assert_array_equal(batch["targets"], user_module.CONFUSION[batch["label"]].astype(np.float32))
    mix_config = targets.MixConfig.from_config(config.augment)
    inputs, made = steps.make_targets(jax.random.PRNGKey(1), batch, num_classes=4, mix_config=mix_config)
    lam = float((inputs[0] - batch["inputs"][-1])[0] / (batch["inputs"][0] - batch["inputs"][-1])[0])  # batch mode
    expected = lam * batch["targets"] + (1 - lam) * batch["targets"][::-1]
    np.testing.assert_allclose(made.dense, expected, rtol=1e-4, atol=1e-5)
    assert 0 < lam < 1 and not np.allclose(made.dense, np.eye(4)[batch["label"]])


def test_the_configs_hard_label_baselines_are_losses_that_read_only_labels():
    """configs/base.py trains its hard-label baselines on one_hot(labels): each must be registered as such."""
    from softnce.configs import base

    assert base.HARD_LABEL_LOSSES
    assert all(losses.get_loss(name).reads_labels_only for name in base.HARD_LABEL_LOSSES)
