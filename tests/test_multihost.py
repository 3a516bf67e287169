"""Two real processes (4 CPU devices each, gloo collectives) against one process with 8 devices.

Both run the real CLI (``softnce.main`` via ``tests/mock_launch.py``) on mock ImageNet with the
paper's ViT recipe (vit_tiny, MixUp/CutMix, layer decay), ``num_shards=2``: the global batches, the
per-device randomness and hence the losses and final parameters must agree.
"""

import glob
import json
import os
import socket
import subprocess
import sys

import jax
import mock_launch
import numpy as np
import pytest
import tensorflow as tf

from softnce import checkpointing, train
from softnce.configs import vit_finetune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 3
NUM_EXAMPLES = 13  # per split; with eval batch 8 the last batch is padded
CONFIG = "configs/vit_finetune.py:dataset=imagenet2012,model=vit_tiny,batch=16"
OVERRIDES = {
    "num_train_steps": STEPS, "log_every_steps": 1, "eval_every_steps": STEPS, "checkpoint_every_steps": STEPS,
    "data.image_size": 32, "data.num_train_examples": NUM_EXAMPLES, "data.num_eval_examples": NUM_EXAMPLES,
    "data.eval_batch_size": 8, "data.randaugment": "", "data.shuffle_buffer": 16, "data.num_shards": 2,
    "loss.noise_prior": "uniform",  # mock data leaves most classes empty
    "model.dtype": "float32", "optim.warmup_steps": 1, "optim.base_lr": 0.05,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(data_dir, workdir, log, env, *flags):
    """The CLI in a subprocess with 4 CPU devices; output goes to ``log``."""
    args = [
        sys.executable, os.path.join(REPO, "tests", "mock_launch.py"),
        f"--mock_data_dir={data_dir}", f"--mock_num_examples={NUM_EXAMPLES}", f"--config={CONFIG}",
        f"--config.data.data_dir={data_dir}", *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
        f"--workdir={workdir}", "--num_cpu_devices=4", *flags,
    ]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def _in_process_config(data_dir):
    config = vit_finetune.get_config(CONFIG.split(":", 1)[1])
    config.data.data_dir = data_dir
    config.update_from_flattened_dict(OVERRIDES)
    return config


def _train_scalars(workdir):
    """``{step: loss}`` from the single TensorBoard event file in ``workdir``."""
    (events,) = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    losses = {}
    for event in tf.compat.v1.train.summary_iterator(events):
        for value in event.summary.value:
            if value.tag == "train/loss":
                losses[event.step] = float(tf.make_ndarray(value.tensor))
    return events, losses


def _final_params(workdir):
    manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"))
    return manager.latest_step(), checkpointing.restore_on_this_host(manager)["params"]


def test_two_processes_match_one_process(tmp_path, cli_env):
    data_dir = str(tmp_path / "data")
    mock_launch.write_metadata(data_dir)  # before the processes start: no race on the metadata
    single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
    address = f"127.0.0.1:{_free_port()}"
    logs = [str(tmp_path / f"process{i}.log") for i in (0, 1)]
    multi = [
        _launch(data_dir, multi_dir, logs[i], cli_env, f"--coordinator_address={address}", "--num_processes=2",
                f"--process_id={i}")
        for i in (0, 1)
    ]
    # The reference, 1 process x 8 devices (conftest), runs here meanwhile.
    with mock_launch.mock_datasets(data_dir, NUM_EXAMPLES):
        train.train_and_evaluate(_in_process_config(data_dir), single_dir)
    for p, log in zip(multi, logs):
        p.wait(timeout=300)
    outputs = [open(log).read() for log in logs]
    for p, out in zip(multi, outputs):
        assert p.returncode == 0, out[-5000:]
    # Progress and eval lines only on process 0.
    assert f"step {STEPS}/{STEPS}" in outputs[0] and "eval at step" in outputs[0]
    assert "step 1/" not in outputs[1] and "eval at step" not in outputs[1]

    # Same per-step losses; float summation order differs (gloo all-reduce across processes).
    events_multi, loss_multi = _train_scalars(multi_dir)
    _, loss_single = _train_scalars(single_dir)
    assert sorted(loss_multi) == sorted(loss_single) == list(range(1, STEPS + 1))
    for step in loss_single:
        assert loss_multi[step] == pytest.approx(loss_single[step], rel=1e-5)
    assert len(set(loss_single.values())) == STEPS  # the steps really differ

    # Same final parameters.
    (s1, p1), (s2, p2) = _final_params(single_dir), _final_params(multi_dir)
    assert s1 == s2 == STEPS
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)
    assert np.abs(p1["head"]["kernel"]).max() > 1e-3  # training moved the head well beyond the tolerance

    # Evaluation: padding masked, and both processes ran ceil(13 / 8) = 2 batches of 4 (else the psum
    # collectives would hang). Under mock_data every sub-split (even_splits share) yields all 13 mock
    # examples, so each process's share is 13 examples cut to 2 x 4 = 8 real ones: 16 in all.
    m1, m2 = (json.load(open(os.path.join(d, "metrics.json"))) for d in (single_dir, multi_dir))
    assert m1["num_examples"] == NUM_EXAMPLES
    assert m2["num_examples"] == 2 * 2 * 4

    # Only process 0 wrote files: one event file, written by process 0's pid.
    assert events_multi.endswith(f".{multi[0].pid}.0.v2"), events_multi
    written = sorted(os.listdir(multi_dir))
    assert written == sorted(["checkpoints", "config.json", "eval_sums.json", "metrics.json", "reliability.png",
                              os.path.basename(events_multi)])


def test_coordinator_without_process_flags_is_a_clear_error(tmp_path, cli_env):
    log = str(tmp_path / "log")
    proc = _launch(str(tmp_path / "data"), str(tmp_path / "w"), log, cli_env, "--coordinator_address=127.0.0.1:1")
    assert proc.wait(timeout=120) != 0
    out = open(log).read()
    assert "missing --num_processes, --process_id" in out
    assert not os.path.exists(tmp_path / "w")
