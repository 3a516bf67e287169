"""Two real processes (4 CPU devices each, gloo collectives) against one process with 8 devices.

The processes run the real CLI (``python -m softnce.main``) on real tiny data (Tiny ImageNet written by
``tests/tiny_images.py``, prepared as array_record once before they start) with the paper's ViT recipe
(vit_tiny, MixUp/CutMix, layer decay): the global batches (each process reads its half of every
global batch), the per-device randomness and hence the losses and final parameters must agree, and
evaluation covers the split exactly once on both. A 2-process run resumed from a middle checkpoint
(the training iterator's state is saved per process) ends exactly where the uninterrupted run did.
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_images

from softnce import checkpointing, distributed, train
from softnce.configs import vit_finetune
from softnce.experiments.stress_preemption import wait_all
from softnce.metric_writer import read_scalars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 4
CHECKPOINT_EVERY = 2  # checkpoints 2 and 4 (max_checkpoints 2 keeps both): the resume test restarts at 2
NUM_TRAIN = 18  # 6 per class; global batch 16: one step an epoch, every step a new permutation
NUM_EVAL = 13  # with eval batch 8 the last batch is padded (5 real examples of 8)
CONFIG = "configs/vit_finetune.py:dataset=tiny_imagenet,model=vit_tiny,batch=16"
OVERRIDES = {
    "num_train_steps": STEPS, "log_every_steps": 1, "eval_every_steps": STEPS,
    "checkpoint_every_steps": CHECKPOINT_EVERY, "max_checkpoints": 2,
    "data.image_size": 32, "data.eval_batch_size": 8, "data.randaugment": "",
    "loss.noise": "uniform",  # the tiny data leave 197 of the 200 classes empty
    "model.dtype": "float32", "optim.warmup_steps": 1, "optim.base_lr": 0.05,
}
RESULT_FILES = ["config.json", "eval_sums.json", "metrics.json", "reliability.png"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(data_dir, workdir, log, env, *flags):
    """``python -m softnce.main`` in a subprocess with 4 CPU devices; output goes to ``log``."""
    args = [
        sys.executable, "-m", "softnce.main", f"--config={CONFIG}", f"--config.data.data_dir={data_dir}",
        *(f"--config.{k}={v}" for k, v in OVERRIDES.items()), f"--workdir={workdir}", "--num_cpu_devices=4", *flags,
    ]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def _launch_two(data_dir, workdir, logs, env):
    """Processes 0 and 1 of a 2-process job over 127.0.0.1."""
    address = f"127.0.0.1:{_free_port()}"
    return [_launch(data_dir, workdir, logs[i], env, f"--coordinator_address={address}", "--num_processes=2",
                    f"--process_id={i}") for i in (0, 1)]


def _wait(processes, logs):
    """Waits for the processes (killing those still running after 300 s); returns their outputs (each must
    have exited 0)."""
    codes, _ = wait_all(processes, 300)
    outputs = [open(log).read() for log in logs]
    for code, out in zip(codes, outputs):
        assert code == 0, out[-5000:]
    return outputs


def _in_process_config(data_dir):
    config = vit_finetune.get_config(CONFIG.split(":", 1)[1])
    config.data.data_dir = data_dir
    config.update_from_flattened_dict(OVERRIDES)
    return config


def _train_losses(workdir):
    """``(event file, {step: loss})`` from the single TensorBoard event file in ``workdir``."""
    (events,) = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    return events, read_scalars(workdir)["train/loss"]


def _final_params(workdir):
    manager = checkpointing.read_only_manager(os.path.join(workdir, "checkpoints"))
    return manager.latest_step(), checkpointing.restore_on_this_host(manager)["params"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Prepared once, before any process starts: no race on the preparation."""
    return tiny_images.prepare_tiny_imagenet(tmp_path_factory.mktemp("tiny") / "data", train_per_class=NUM_TRAIN // 3,
                                             num_val=NUM_EVAL, size=32)


@pytest.fixture(scope="module")
def two_process_run(data_dir, tmp_path_factory):
    """An uninterrupted 2-process run: ``(workdir, outputs of processes 0 and 1)``."""
    tmp = tmp_path_factory.mktemp("multi")
    workdir, logs = str(tmp / "run"), [str(tmp / f"process{i}.log") for i in (0, 1)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as conftest's cli_env (module scope)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return workdir, _wait(_launch_two(data_dir, workdir, logs, env), logs)


def test_two_processes_match_one_process(data_dir, two_process_run, tmp_path):
    multi_dir, outputs = two_process_run
    single_dir = str(tmp_path / "single")
    train.train_and_evaluate(_in_process_config(data_dir), single_dir)  # 1 process x 8 devices (conftest)
    # Progress and eval lines only on process 0.
    assert f"step {STEPS}/{STEPS}" in outputs[0] and "eval at step" in outputs[0]
    assert "step 1/" not in outputs[1] and "eval at step" not in outputs[1]

    # Same per-step losses; float summation order differs (gloo all-reduce across processes).
    events_multi, loss_multi = _train_losses(multi_dir)
    _, loss_single = _train_losses(single_dir)
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

    # Evaluation is exact on 2 processes: each reads its half of every global eval batch, padding
    # masked, both run ceil(13 / 8) = 2 batches (else the collectives would hang), and together they
    # cover the 13 examples exactly once, as the single process does.
    m1, m2 = (json.load(open(os.path.join(d, "metrics.json"))) for d in (single_dir, multi_dir))
    assert m1["num_examples"] == m2["num_examples"] == NUM_EVAL
    for name in ("top1", "nll"):
        assert m2[name] == pytest.approx(m1[name], rel=1e-4, abs=1e-6)

    # Only process 0 wrote files: one event file (tensorboardX), the results, the checkpoints.
    assert sorted(os.listdir(multi_dir)) == sorted(["checkpoints", *RESULT_FILES, os.path.basename(events_multi)])
    # Each process saved its own iterator state with each checkpoint.
    for step in (CHECKPOINT_EVERY, STEPS):
        for i in (0, 1):
            state = json.load(open(os.path.join(multi_dir, "checkpoints", str(step), "data", f"process_{i}-of-2.json")))
            assert state == {"next_index": step}


def test_exact_resume_on_two_processes_from_a_middle_checkpoint(data_dir, two_process_run, tmp_path, cli_env):
    """The uninterrupted run's workdir with its newest checkpoint and results removed is a run stopped after
    step 2 of 4 (what the workdir held then, the checkpoints being deterministic); rerun with the same command
    it resumes there, restoring each process's iterator state, and ends with the very same parameters."""
    whole_dir, _ = two_process_run
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(whole_dir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", str(STEPS)))
    for name in [*RESULT_FILES, *(os.path.basename(f) for f in glob.glob(os.path.join(whole_dir, "events.*")))]:
        os.remove(os.path.join(resumed_dir, name))
    assert sorted(os.listdir(os.path.join(resumed_dir, "checkpoints"))) == [str(CHECKPOINT_EVERY)]

    logs = [str(tmp_path / f"process{i}.log") for i in (0, 1)]
    outputs = _wait(_launch_two(data_dir, resumed_dir, logs, cli_env), logs)
    assert f"resumed from the checkpoint of step {CHECKPOINT_EVERY}" in outputs[0], outputs[0][-3000:]
    assert "step 1/" not in outputs[0] and f"step {CHECKPOINT_EVERY + 1}/{STEPS}" in outputs[0]

    (s1, p1), (s2, p2) = _final_params(whole_dir), _final_params(resumed_dir)
    assert s1 == s2 == STEPS
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(b, a, rtol=0, atol=0)  # bit for bit: same batches, same programs
    losses_whole, losses_resumed = read_scalars(whole_dir)["train/loss"], read_scalars(resumed_dir)["train/loss"]
    assert sorted(losses_resumed) == list(range(CHECKPOINT_EVERY + 1, STEPS + 1))
    for step in losses_resumed:
        assert losses_resumed[step] == losses_whole[step]
    metrics = [json.load(open(os.path.join(d, "metrics.json"))) for d in (whole_dir, resumed_dir)]
    assert metrics[0] == metrics[1]


def test_coordinator_without_process_flags_is_a_clear_error(tmp_path, cli_env):
    log = str(tmp_path / "log")
    proc = _launch(str(tmp_path / "data"), str(tmp_path / "w"), log, cli_env, "--coordinator_address=127.0.0.1:1")
    assert proc.wait(timeout=120) != 0
    out = open(log).read()
    assert "missing --num_processes, --process_id" in out
    assert not os.path.exists(tmp_path / "w")


PSUM_PROGRAM = """
import sys
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from softnce import distributed
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
mesh = distributed.make_mesh()
total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x.sum(keepdims=True), "data"), mesh=mesh,
                              in_specs=P("data"), out_specs=P("data")))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.full(2, 1.0 + int(sys.argv[2])))
print("psum", float(total(x).addressable_data(0)[0]))
"""


def test_two_processes_run_again_with_the_compilation_cache_they_filled(tmp_path, cli_env):
    """The second launch finds every program in the persistent compilation cache; on jaxlib 0.12.1 such
    executables hang in their first cross-process collective, so softnce.distributed turns the cache off
    there (docs/running_at_scale.md), and nothing is written to it. Both launches must finish, with the
    right sum."""
    cache = tmp_path / "cache"
    env = dict(cli_env, JAX_COMPILATION_CACHE_DIR=str(cache))
    for launch in ("cold", "warm"):
        address = f"127.0.0.1:{_free_port()}"
        logs = [str(tmp_path / f"{launch}{i}.log") for i in (0, 1)]
        processes = [subprocess.Popen([sys.executable, "-c", PSUM_PROGRAM, address, str(i)], cwd=REPO, env=env,
                                      stdout=open(log, "w"), stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
        codes, _ = wait_all(processes, 120)
        outputs = [open(log).read() for log in logs]
        assert codes == [0, 0], (launch, outputs)
        assert all("psum 6.0" in out for out in outputs), outputs  # 2 x 1.0 + 2 x 2.0
        filled = cache.exists() and any(cache.iterdir())
        assert filled != distributed.cached_cpu_collectives_hang(), (launch, filled)


def test_the_jaxlib_releases_whose_cached_cpu_collectives_hang():
    assert not any(map(distributed.cached_cpu_collectives_hang, ("0.10.2", "0.11.2", "0.12.0")))
    assert all(map(distributed.cached_cpu_collectives_hang, ("0.12.1", "0.12.2.dev20261201", "0.13.0")))
