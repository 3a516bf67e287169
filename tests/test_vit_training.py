"""The ViT recipe end to end on real tiny data (Tiny ImageNet written by ``tests/tiny_images.py`` and
prepared as array_record): start-up order (resume > init.checkpoint > init.pretrained > scratch), exact
resume (the training iterator's state is checkpointed), and the error for data that was never prepared."""

import json
import os

import jax
import numpy as np
import pytest
import tiny_images
from flax import traverse_util
from test_vit import mae_state_dict  # a random MAE state dict of vit_tiny's shapes

from softnce import assembly, checkpointing, models, train
from softnce.configs import vit_finetune
from softnce.models import mae_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUM_TRAIN, NUM_EVAL = 18, 10  # 6 training images in each of 3 classes; eval batches of 8: the last is padded
NUM_CLASSES = 200  # tiny_imagenet keeps its 200 classes whatever wnids.txt lists
SHAPE = (32, 32, 3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Real tiny_imagenet (32 x 32 JPEGs) prepared once for the module's tests."""
    return tiny_images.prepare_tiny_imagenet(tmp_path_factory.mktemp("tiny") / "data", train_per_class=NUM_TRAIN // 3,
                                             num_val=NUM_EVAL, size=32)


def vit_config(data_dir, **init):
    config = vit_finetune.get_config("dataset=tiny_imagenet,model=vit_tiny,batch=16")
    config.num_train_steps = 2
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 1
    config.data.update(dict(data_dir=str(data_dir), image_size=32, eval_batch_size=8, randaugment=""))
    config.loss.noise = "uniform"  # the tiny data leave 197 of the 200 classes empty
    config.model.dtype = "float32"
    config.optim.update(dict(warmup_steps=1, base_lr=0.05))
    for key, value in init.items():
        config.init[key] = value
    return config


def start_params(config):
    """The trainer's start-up params (no workdir checkpoint) with its init rng."""
    model = models.get_model(config.model, NUM_CLASSES)
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
    fresh = model.init(init_rng, np.zeros((1, *SHAPE), np.float32), train=False)["params"]
    return fresh, assembly.initial_variables(config, model, SHAPE, init_rng)["params"]


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_start_up_order(tmp_path, data_dir):
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
    config = vit_config(data_dir, pretrained=pretrained_dir)
    assert train.train_and_evaluate(config, workdir, stop_at_step=1) == {"preempted_at_step": 1}
    # ... resumes from the workdir: neither init path is read (both missing here).
    resumed = vit_config(data_dir, pretrained=missing, checkpoint=missing)
    result = train.train_and_evaluate(resumed, workdir)
    assert result["step"] == 2 and result["num_examples"] == NUM_EVAL
    manager = checkpointing.read_only_manager(os.path.join(workdir, "checkpoints"))  # the weights alone
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


def _trained_params(workdir):
    manager = checkpointing.read_only_manager(os.path.join(workdir, "checkpoints"))
    return manager.latest_step(), checkpointing.restore_on_this_host(manager)["params"]


def test_exact_resume_on_one_process_equals_an_uninterrupted_run(tmp_path, data_dir, monkeypatch):
    """Exact resume, 1 process: stopped after step 2 of 4 and resumed, the run ends with the parameters
    of an uninterrupted run, bit for bit; the resumed run reads on from the checkpointed iterator state."""
    from softnce.data import images

    config = vit_config(data_dir)
    config.num_train_steps = 4  # 18 examples, global batch 16: one step an epoch, each a new permutation
    config.eval_every_steps = 4
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train.train_and_evaluate(config, whole)
    assert train.train_and_evaluate(config, parts, stop_at_step=2) == {"preempted_at_step": 2}
    state_file = os.path.join(parts, "checkpoints", "2", "data", "process_0-of-1.json")
    assert os.path.exists(state_file)
    assert json.load(open(state_file)) == {"next_index": 2}  # steps 1 and 2 read batches 0 and 1
    starts = []  # the resumed run must not restart its stream at a step: it restores the saved state
    original = images.ImageDataset.train_batches
    monkeypatch.setattr(images.ImageDataset, "train_batches",
                        lambda self, *a, **kw: starts.append(kw.get("start_step", 0)) or original(self, *a, **kw))
    result = train.train_and_evaluate(config, parts)
    assert starts == [0] and result["step"] == 4
    (step_whole, p_whole), (step_parts, p_parts) = _trained_params(whole), _trained_params(parts)
    assert step_whole == step_parts == 4
    jax.tree.map(np.testing.assert_array_equal, p_parts, p_whole)
    assert json.load(open(os.path.join(parts, "checkpoints", "4", "data", "process_0-of-1.json"))) == {"next_index": 4}
    metrics = [json.load(open(os.path.join(d, "metrics.json"))) for d in (whole, parts)]
    assert metrics[0]["num_examples"] == metrics[1]["num_examples"] == NUM_EVAL
    assert metrics[0]["nll"] == metrics[1]["nll"]


def test_unprepared_data_is_a_clear_error_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    config = vit_config(tmp_path / "empty_data_dir")
    config.data.name = "imagenet2012"
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
