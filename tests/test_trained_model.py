"""Using a trained model: ``softnce.evaluate`` (a checkpoint, another split, 1 and 8 devices),
``softnce.inference`` (calibrated probabilities from a checkpoint alone, old workdirs) and
``softnce.export`` (a jax-only artefact, checked in a fresh process), on digits, Fashion-MNIST and a ViT."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, softmax
from test_fashion_mnist import SIZES, prepared  # noqa: F401  (prepared: the fake IDX fixture)
from test_train import small_config

from softnce import assembly, checkpoint_metadata, evaluate, export, inference, train
from softnce.data.digits import load_digits_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quiet(_line):
    pass


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished 12-step digits run on 8 devices (checkpoints 8 and 12; t* fitted at the end)."""
    workdir = tmp_path_factory.mktemp("digits") / "run"
    train.train_and_evaluate(small_config(), str(workdir))
    return workdir


def _run_evaluate_cli(workdir, devices, env, *extra):
    cmd = [sys.executable, "-m", "softnce.evaluate", f"--workdir={workdir}", f"--num_cpu_devices={devices}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _assert_same_metrics(ours, theirs, rel):
    for key in ("top1", "top5", "num_examples", "step"):
        assert ours[key] == theirs[key], key
    for key in ("nll", "ece", "t_star", "nll_calibrated", "ece_calibrated"):
        assert ours[key] == pytest.approx(theirs[key], rel=rel, abs=1e-7), key


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_equals_the_run_on_1_and_8_devices(digits_run, cli_env):
    """The CLI on 1 device (a subprocess) and the library on this process's 8 devices."""
    before = {name: _digest(digits_run / name) for name in ("metrics.json", "eval_sums.json", "reliability.png")}
    entries = set(os.listdir(digits_run))
    proc = _run_evaluate_cli(digits_run, 1, cli_env, "--name=one")
    lines = []
    eight, eight_dir = evaluate.evaluate_checkpoint(str(digits_run), log=lines.append)  # meanwhile, 8 devices
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output
    assert "wrote " in output and "step 12 test: top1" in output and lines[-1] == f"wrote {eight_dir}"
    run = json.load(open(digits_run / "metrics.json"))
    one_dir = digits_run / "eval" / "one-12"
    assert eight_dir == digits_run / "eval" / "test-12"
    one = json.load(open(one_dir / "metrics.json"))
    assert json.load(open(eight_dir / "metrics.json")) == eight
    _assert_same_metrics(eight, run, rel=1e-6)  # the trainer's own eval step and batches
    _assert_same_metrics(one, run, rel=1e-5)  # another device count: float summation order only
    assert eight["split"] == "test" and eight["t_star_source"] == "checkpoint"
    for name in ("eval_sums.json", "eval_sums_calibrated.json", "reliability.png", "eval_config.json"):
        assert (eight_dir / name).exists(), name
    sums, run_sums = (json.load(open(d / "eval_sums_calibrated.json")) for d in (eight_dir, digits_run))
    for key in run_sums:
        np.testing.assert_allclose(sums[key], run_sums[key], rtol=1e-5, atol=1e-4)
    # The run's own results are untouched; only eval/ is new.
    assert {name: _digest(digits_run / name) for name in before} == before
    assert set(os.listdir(digits_run)) == entries | {"eval"}


def test_evaluate_validation_with_a_refit_an_earlier_step_and_a_data_override(digits_run):
    run = json.load(open(digits_run / "metrics.json"))
    val, out = evaluate.evaluate_checkpoint(str(digits_run), split="validation", refit_temperature=True, log=_quiet)
    assert out.name == "validation-12" and val["num_examples"] == round(0.1 * 1257)
    assert val["t_star_source"] == "refit"
    assert val["t_star"] == pytest.approx(run["t_star"], rel=1e-5)  # the same fit on the same split

    early, out = evaluate.evaluate_checkpoint(str(digits_run), step=8, log=_quiet)
    assert out.name == "test-8" and early["step"] == 8
    assert "t_star" not in early  # an intermediate checkpoint has no t*
    assert not (out / "eval_sums_calibrated.json").exists() and (out / "reliability.png").exists()

    config = checkpoint_metadata.read_run_config(digits_run)
    config.data.validation_fraction = 0.2  # another validation split; the test split is the same
    other, out = evaluate.evaluate_checkpoint(str(digits_run), config=config, refit_temperature=True, log=_quiet)
    assert out.name == "test+validation_fraction=0.2-12"
    assert other["top1"] == run["top1"] and other["nll"] == pytest.approx(run["nll"], rel=1e-6)
    assert other["t_star"] != pytest.approx(run["t_star"], rel=1e-4)

    missing = r"no checkpoint of step 5 .* saved steps are 8, 12"
    with pytest.raises(checkpoint_metadata.CheckpointNotFoundError, match=missing):
        evaluate.evaluate_checkpoint(str(digits_run), step=5, log=_quiet)
    config = checkpoint_metadata.read_run_config(digits_run)
    config.loss.temperature = 2.0
    with pytest.raises(ValueError, match="only config.data can differ"):
        evaluate.evaluate_checkpoint(str(digits_run), config=config, log=_quiet)


def test_evaluate_on_two_processes(digits_run, cli_env):
    """Two processes x 2 devices (gloo): the same numbers; only process 0 writes and prints."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [_run_evaluate_cli(digits_run, 2, cli_env, "--name=two_processes", "--refit_temperature",
                               f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}")
             for i in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "wrote " in outputs[0] and "wrote " not in outputs[1]
    run = json.load(open(digits_run / "metrics.json"))
    metrics = json.load(open(digits_run / "eval" / "two_processes-12" / "metrics.json"))
    assert metrics["t_star_source"] == "refit"  # t* fitted again from the logits gathered over processes
    _assert_same_metrics(metrics, run, rel=1e-5)


# ------------------------------------------------------------------------------------------ inference


def test_load_predicts_calibrated_probabilities_from_the_checkpoint_alone(digits_run, tmp_path):
    run = json.load(open(digits_run / "metrics.json"))
    x_train, y_train, x_test, y_test = load_digits_split()
    clf = inference.load(str(digits_run))
    assert clf.step == 12 and clf.t_star == run["t_star"] and clf.temperature == 1.0
    assert clf.class_names == [str(c) for c in range(10)] and clf.example_shape == (8, 8, 1)
    dataset = assembly.make_dataset_and_model(small_config())[0]
    counts = np.bincount(dataset.train_labels, minlength=10)
    np.testing.assert_allclose(clf.noise_probs, counts / counts.sum(), rtol=1e-5)

    z = clf.logits(x_test).astype(np.float64)
    p = clf.predict_proba(x_test)
    np.testing.assert_allclose(p, softmax(z / clf.t_star, axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(x_test, calibrated=False), softmax(z, axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(clf.predict(x_test), np.argmax(z, axis=1))
    assert np.mean(clf.predict(x_test) == y_test) == pytest.approx(run["top1"])
    nll = -np.mean(log_softmax(z / clf.t_star, axis=1)[np.arange(len(y_test)), y_test])
    assert nll == pytest.approx(run["nll_calibrated"], rel=1e-4)  # the calibrated test NLL the run reported
    np.testing.assert_allclose(clf.predict_proba(x_test[0]), p[0], rtol=1e-6)  # one example
    with pytest.raises(ValueError, match=r"inputs must have shape \[n, 8, 8, 1\]"):
        clf.predict_proba(x_test.reshape(-1, 64))

    # The checkpoint directory alone (no workdir around it) is enough.
    alone = tmp_path / "somewhere" / "12"
    shutil.copytree(digits_run / "checkpoints" / "12", alone)
    np.testing.assert_array_equal(inference.load(str(alone)).predict_proba(x_test), p)

    early = inference.load(str(digits_run), step=8)
    assert early.step == 8 and early.t_star is None
    with pytest.raises(ValueError, match="no fitted temperature"):
        early.predict_proba(x_test)
    assert early.fit_temperature(dataset.val_inputs, dataset.val_labels) > 0
    assert early.predict_proba(x_test).shape == (540, 10)


def _strip_metadata(workdir):
    """Makes ``workdir`` look as an older softnce left it: no softnce metadata in any checkpoint."""
    for step in os.listdir(workdir / "checkpoints"):
        step_dir = workdir / "checkpoints" / step
        (step_dir / checkpoint_metadata.FILENAME).unlink(missing_ok=True)
        orbax_metadata = json.load(open(step_dir / "_CHECKPOINT_METADATA"))
        assert "softnce" in orbax_metadata["custom_metadata"]
        orbax_metadata["custom_metadata"] = {}
        json.dump(orbax_metadata, open(step_dir / "_CHECKPOINT_METADATA", "w"))


def test_a_workdir_saved_before_the_metadata_still_loads(digits_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(digits_run, old, ignore=shutil.ignore_patterns("eval"))
    _strip_metadata(old)
    run = json.load(open(digits_run / "metrics.json"))
    x_test = load_digits_split()[2]
    with pytest.warns(UserWarning, match=r"saved without softnce metadata .* t\* = .* from .*metrics.json"):
        clf = inference.load(str(old))
    assert clf.t_star == run["t_star"] and clf.class_names[3] == "3"
    np.testing.assert_array_equal(clf.predict_proba(x_test), inference.load(str(digits_run)).predict_proba(x_test))
    with pytest.warns(UserWarning, match="without softnce metadata"):
        metrics, _ = evaluate.evaluate_checkpoint(str(old), log=_quiet)
    assert metrics["t_star_source"] == "metrics.json"
    _assert_same_metrics(metrics, run, rel=1e-6)
    with pytest.raises(checkpoint_metadata.MetadataError, match="no softnce metadata"):
        shutil.copytree(old / "checkpoints" / "12", tmp_path / "alone" / "12")
        inference.load(str(tmp_path / "alone" / "12"))


# ------------------------------------------------------------------------------------------ export


RUN_EXPORT = """
import json, os, sys
import numpy as np
import load  # the export's load.py, found through PYTHONPATH=DIR
model = load.load(sys.argv[1])
inputs = np.load(sys.argv[2])
out = {}
for name in inputs.files:
    x = inputs[name]
    out[name + "/proba"] = model.predict_proba(x)
    out[name + "/raw"] = model.predict_proba(x, calibrated=False)
    out[name + "/logits"] = model.logits(x)
    out[name + "/predict"] = model.predict(x)
np.savez(sys.argv[3], **out)
imported = sorted({m.split(".")[0] for m in sys.modules} & {"softnce", "flax", "tensorflow", "optax", "orbax"})
print(json.dumps({"imported": imported, "jax": "jax" in sys.modules, "classes": model.class_names,
                  "loader": os.path.dirname(os.path.realpath(load.__file__))}))
"""


def check_export_in_fresh_process(export_dir, classifier, inputs: dict, tmp_path):
    """Runs the export in a new python with only jax (cwd outside the repository, ``import load`` through
    ``PYTHONPATH=export_dir``); compares to ``classifier``."""
    np.savez(tmp_path / "inputs.npz", **inputs)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(export_dir)
    proc = subprocess.run([sys.executable, "-c", RUN_EXPORT, str(export_dir), str(tmp_path / "inputs.npz"),
                           str(tmp_path / "outputs.npz")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["imported"] == [] and report["jax"], report  # neither softnce, Flax nor TensorFlow
    assert report["classes"] == classifier.class_names
    assert report["loader"] == os.path.realpath(export_dir), report  # the export's own load.py
    outputs = np.load(tmp_path / "outputs.npz")
    worst = 0.0
    for name, x in inputs.items():
        expected = {"proba": classifier.predict_proba(x), "raw": classifier.predict_proba(x, calibrated=False),
                    "logits": classifier.logits(x)}
        for kind, value in expected.items():
            np.testing.assert_allclose(outputs[f"{name}/{kind}"], value, rtol=0, atol=1e-6)
            worst = max(worst, float(np.max(np.abs(outputs[f"{name}/{kind}"] - value))))
        np.testing.assert_array_equal(outputs[f"{name}/predict"], classifier.predict(x))
    return worst


def test_a_run_saved_with_the_earlier_names_loads_and_evaluates(digits_run, tmp_path):
    """Metadata version 1 (the noise distribution named class_prior), a config.json with loss.noise_prior and
    a metrics.json with t* named temperature: read with today's names, the same predictions and metrics."""
    old = tmp_path / "old"
    shutil.copytree(digits_run, old, ignore=shutil.ignore_patterns("eval"))
    config = json.load(open(old / "config.json"))
    config["loss"] = {("noise_prior" if k == "noise" else k): v for k, v in config["loss"].items()}
    (old / "config.json").write_text(json.dumps(config))
    for path in (old / "checkpoints").glob(f"*/{checkpoint_metadata.FILENAME}"):
        metadata = json.load(open(path))
        metadata = {("class_prior" if k == "noise_probs" else k): v for k, v in metadata.items()}
        metadata.update(version=1, config=config)
        path.write_text(json.dumps(metadata))
    metrics_json = json.load(open(old / "metrics.json"))
    metrics_json["temperature"] = metrics_json.pop("t_star")
    (old / "metrics.json").write_text(json.dumps(metrics_json))
    clf, now = inference.load(str(old)), inference.load(str(digits_run))
    assert clf.metadata["version"] == 1 and "class_prior" not in clf.metadata
    np.testing.assert_array_equal(clf.noise_probs, now.noise_probs)
    assert clf.metadata["config"]["loss"]["noise"] == now.metadata["config"]["loss"]["noise"]
    x_test = load_digits_split()[2]
    np.testing.assert_array_equal(clf.predict_proba(x_test), now.predict_proba(x_test))
    assert checkpoint_metadata.read_run_config(old).loss.noise == "class_prior"
    metrics, _ = evaluate.evaluate_checkpoint(str(old), log=_quiet)
    _assert_same_metrics(metrics, json.load(open(digits_run / "metrics.json")), rel=1e-6)


def test_export_cli_digits_runs_with_jax_only(digits_run, tmp_path, cli_env):
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "softnce.export", f"--workdir={digits_run}", f"--out={out}"],
                          cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exported step 12 (10 classes" in proc.stdout
    assert sorted(os.listdir(out)) == sorted(export.FILES)
    metadata = json.load(open(out / "metadata.json"))
    assert metadata["t_star"] == json.load(open(digits_run / "metrics.json"))["t_star"]
    assert metadata["version"] == checkpoint_metadata.VERSION and metadata["export"]["format"] == "softnce-export"
    x_test = load_digits_split()[2]
    worst = check_export_in_fresh_process(out, inference.load(str(digits_run)), {"all": x_test, "three": x_test[:3]},
                                          tmp_path)
    print(f"digits export: max |difference| {worst:.2e}")
    # A second export into the same directory replaces it; a directory holding other files is refused.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "softnce.export", f"--workdir={digits_run}",
                           f"--out={tmp_path / 'other'}"], cwd=REPO, env=cli_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "holds other files (notes.txt)" in proc.stderr


def test_vit_export_matches_the_in_process_model(tmp_path):
    from softnce.data.device_augment import EvalTransform
    from softnce.data.images import SPECS
    from softnce.models import vit

    model = vit.vit_tiny(10)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    spec = SPECS["imagenet2012"]
    metadata = {
        "version": 2, "step": 0, "num_classes": 10, "class_names": [f"class{c}" for c in range(10)],
        "noise_probs": [0.1] * 10, "temperature": 1.0, "t_star": 0.7, "config": {},
        "input": {"shape": [32, 32, 3], "dtype": "uint8",
                  "transform": checkpoint_metadata.transform_spec(EvalTransform(spec.mean, spec.std))},
    }
    clf = inference.Classifier(model, variables, metadata, EvalTransform(spec.mean, spec.std))
    images = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8 images"):
        clf.predict_proba(images.astype(np.float32))
    export.export_classifier(clf, tmp_path / "vit")
    worst = check_export_in_fresh_process(tmp_path / "vit", clf, {"five": images, "two": images[:2]}, tmp_path)
    print(f"ViT export: max |difference| {worst:.2e}")


# ------------------------------------------------------------------------------------------ Fashion-MNIST


def test_fashion_mnist_run_evaluate_predict_and_export(prepared, tmp_path):  # noqa: F811
    from softnce.configs import fashion_mnist as fashion_config
    from softnce.data import fashion_mnist as fm

    data_dir, _ = prepared
    config = fashion_config.get_config("loss=soft_target_infonce,steps=4")  # as test_fashion_mnist's tiny_args
    config.data.update(dict(data_dir=data_dir, batch_size=32, eval_batch_size=16))
    config.model.update(dict(channels=(4, 8), hidden=16))
    config.optim.warmup_steps, config.log_every_steps = 1, 2
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    run = json.load(open(workdir / "metrics.json"))

    metrics, out = evaluate.evaluate_checkpoint(str(workdir), log=_quiet)  # 8 devices
    assert out.name == "test-4" and (out / "reliability.png").exists()
    _assert_same_metrics(metrics, run, rel=1e-6)

    clf = inference.load(str(workdir))
    assert clf.class_names == list(fm.CLASS_NAMES) and clf.t_star == run["t_star"]
    dataset = assembly.make_dataset_and_model(config)[0]
    probabilities = clf.predict_proba(dataset.eval_inputs)
    assert probabilities.shape == (SIZES["test"], 10) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    labels = dataset.eval_labels
    nll = -np.mean(np.log(probabilities[np.arange(len(labels)), labels]))
    assert nll == pytest.approx(run["nll_calibrated"], rel=1e-4)

    export.export_classifier(clf, tmp_path / "export")
    worst = check_export_in_fresh_process(tmp_path / "export", clf, {"all": dataset.eval_inputs}, tmp_path)
    print(f"small CNN export: max |difference| {worst:.2e}")
