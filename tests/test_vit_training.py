"""The ViT recipe end to end on mock ImageNet: start-up order (resume > init.checkpoint >
init.pretrained > scratch) and the error for data that was never prepared."""

import os

import jax
import mock_launch
import numpy as np
import pytest
from flax import traverse_util
from test_vit import mae_state_dict  # a random MAE state dict of vit_tiny's shapes

from softnce import checkpointing, models, train
from softnce.configs import vit_finetune
from softnce.models import mae_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUM_EXAMPLES = 16
SHAPE = (32, 32, 3)


def vit_config(data_dir, **init):
    config = vit_finetune.get_config("dataset=imagenet2012,model=vit_tiny,batch=16")
    config.num_train_steps = 2
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 1
    config.data.update(dict(data_dir=str(data_dir), image_size=32, num_train_examples=NUM_EXAMPLES,
                            num_eval_examples=NUM_EXAMPLES, eval_batch_size=8, randaugment="",
                            shuffle_buffer=16))
    config.loss.noise_prior = "uniform"  # mock data leaves most classes empty
    config.model.dtype = "float32"
    config.optim.update(dict(warmup_steps=1, base_lr=0.05))
    for key, value in init.items():
        config.init[key] = value
    return config


def start_params(config):
    """The trainer's start-up params (no workdir checkpoint) with its init rng."""
    model = models.get_model(config.model, 1000)
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
    fresh = model.init(init_rng, np.zeros((1, *SHAPE), np.float32), train=False)["params"]
    return fresh, train.initial_params(config, model, SHAPE, init_rng)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_start_up_order(tmp_path):
    pretrained_dir = str(tmp_path / "mae_vit_tiny")
    pretrained = mae_checkpoint.convert_mae_state_dict(mae_state_dict(seed=3))
    mae_checkpoint.save_pretrained_params(pretrained_dir, pretrained)
    missing = str(tmp_path / "does_not_exist")

    # Scratch: no init -> the model's own initialisation.
    fresh, params = start_params(vit_config(tmp_path))
    assert_trees_equal(params, fresh)

    # init.pretrained: every pretrained leaf loaded; fc_norm and head fresh.
    fresh, params = start_params(vit_config(tmp_path, pretrained=pretrained_dir))
    flat, flat_fresh = traverse_util.flatten_dict(params), traverse_util.flatten_dict(fresh)
    flat_pretrained = traverse_util.flatten_dict(pretrained)
    assert {p for p in flat if p not in flat_pretrained} == {p for p in flat if p[0] in ("fc_norm", "head")}
    for path, value in flat.items():
        np.testing.assert_array_equal(value, flat_pretrained.get(path, flat_fresh[path]))

    # Training from init.pretrained in a workdir, stopped after step 1 ...
    workdir = str(tmp_path / "run")
    with mock_launch.mock_datasets(str(tmp_path / "data"), NUM_EXAMPLES):
        config = vit_config(tmp_path / "data", pretrained=pretrained_dir)
        assert train.train_and_evaluate(config, workdir, stop_at_step=1) == {"preempted_at_step": 1}
        # ... resumes from the workdir: neither init path is read (both missing here).
        resumed = vit_config(tmp_path / "data", pretrained=missing, checkpoint=missing)
        result = train.train_and_evaluate(resumed, workdir)
    assert result["step"] == 2 and result["num_examples"] == NUM_EXAMPLES
    manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"))
    assert manager.all_steps() == [1, 2]
    trained = checkpointing.restore_on_this_host(manager)["params"]
    # The trainer started from the pretrained weights: the learning rate of step 1 is 0 (warm-up),
    # so the step-1 checkpoint holds them exactly; step 2 moved them.
    step1 = checkpointing.restore_on_this_host(manager, 1)["params"]
    assert_trees_equal({k: step1[k] for k in pretrained}, pretrained)
    assert not np.array_equal(trained["embedding"]["kernel"], pretrained["embedding"]["kernel"])

    # init.checkpoint beats init.pretrained: a new run starts from the earlier run's final params.
    checkpoint_config = vit_config(tmp_path, checkpoint=os.path.join(workdir, "checkpoints"), pretrained=missing)
    _, params = start_params(checkpoint_config)
    assert_trees_equal(params, trained)
    with pytest.raises(FileNotFoundError, match="holds no finished checkpoint"):
        start_params(vit_config(tmp_path, checkpoint=str(tmp_path)))


def test_unprepared_data_is_a_clear_error_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    config = vit_config(tmp_path / "empty_data_dir")
    with pytest.raises(FileNotFoundError) as error:
        train.train_and_evaluate(config, str(workdir))
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar" in message and "python -m softnce.data.images --name imagenet2012" in message
    assert not workdir.exists()  # no workdir, no checkpoints directory


def test_workdir_paths_keep_urls_and_absolutise_local_paths(tmp_path, monkeypatch):
    url = checkpointing.resolve("gs://bucket/runs/a") / "checkpoints"
    assert os.fspath(url) == "gs://bucket/runs/a/checkpoints"
    monkeypatch.chdir(tmp_path)
    assert os.fspath(checkpointing.resolve("runs/a")) == os.path.join(str(tmp_path), "runs", "a")
