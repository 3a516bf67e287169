"""Smoke tests of the benchmarks (softnce.experiments.bench_*): each ``--quick`` run finishes and prints its table."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from softnce import losses
from softnce.experiments import bench_scale, bench_train_step, gpu_benchmark


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell}")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_bench_scale_quick(capsys):
    bench_scale.main(["--quick"])
    out = capsys.readouterr().out
    assert "Machine:" in out and "Load average" in out
    row = _table_rows(out, "10 | 16 |")[0]  # the loss table comes first
    times = row[2:6]  # optax CE, dense, structured, blockwise: all timed at this size
    assert all(re.fullmatch(r"[0-9.]+ \(2\)", cell) for cell in times), row
    # Communication: M = 16, C = 10, 8 devices: 7/8 of 16 rows of 40 B (dense), of 2 * 8 + 4 = 20 B.
    (comm,) = _table_rows(out, "10 | 16 | 8 |")
    assert comm[3] == "560 B" and comm[4] == "280 B" and comm[5] == "2", comm


def test_comm_bytes_formulas():
    assert bench_scale.all_gather_bytes_received(4096, 4 * 21843, 1) == 0
    assert bench_scale.all_gather_bytes_received(4096, 20, 8) == 7 / 8 * 4096 * 20
    assert bench_scale.ring_all_reduce_bytes_received(100, 4) == 150


def test_bench_train_step_quick(capsys):
    bench_train_step.main(["--quick", "--variants", "STI structured"])
    out = capsys.readouterr().out
    assert "Machine:" in out and "Load average" in out
    (ce,) = _table_rows(out, "soft CE")
    (sti,) = _table_rows(out, "STI structured")
    assert float(ce[1]) > 0 and ce[3] == "-"
    assert all(re.fullmatch(r"[+-][0-9.]+%", cell) for cell in sti[3:5]), sti


def test_gpu_benchmark_quick_runs_on_cpu(capsys):
    gpu_benchmark.main(["--quick", "--variants", "soft CE", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "JAX device:" in out
    (row,) = _table_rows(out, "JAX (softnce)")
    assert row[2] == "soft CE" and float(row[3]) > 0
    if gpu_benchmark.torch_skip_reason(gpu_benchmark.parse_args(["--quick"])) is not None:
        assert "PyTorch part skipped:" in out


def test_torch_reference_losses_match_softnce():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 5)).astype(np.float32)
    targets = rng.dirichlet(np.ones(5), size=6).astype(np.float32)
    log_eta = np.log(rng.dirichlet(np.ones(5))).astype(np.float32)
    as_torch = [torch.from_numpy(x) for x in (logits, targets, log_eta)]
    sti = losses.soft_target_infonce(jnp.asarray(logits), jnp.asarray(targets), log_noise_probs=jnp.asarray(log_eta),
                                     temperature=0.5)
    ce = losses.soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), temperature=0.5)
    np.testing.assert_allclose(gpu_benchmark.reference_sti_torch(*as_torch, 0.5).item(), float(sti.mean()), rtol=1e-5)
    np.testing.assert_allclose(gpu_benchmark.soft_ce_torch(*as_torch, 0.5).item(), float(ce.mean()), rtol=1e-5)
