"""Smoke test of softnce.experiments.bench_input_pipeline: a --quick run prints its table and last line."""

import re

from softnce.experiments import bench_input_pipeline


def test_bench_input_pipeline_quick(capsys):
    assert len(bench_input_pipeline.photo_paths()) >= 2  # scikit-learn's photos at least
    bench_input_pipeline.main(["--quick"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\| (train|eval) \| [12] \|", line)]
    assert len(rows) == 4 or len(rows) == 2  # 1 thread and all cores (2 on the CI machine)
    for row in rows:
        ours = float(row.split("|")[3])
        assert ours > 0
    assert "device half" in out
    end_to_end = re.findall(
        r"^end to end: ImageDataset\.train_batches\(32\) from array_record, host_threads=(\d+): (\d+) img/s",
        out, re.MULTILINE)
    assert 1 <= len(end_to_end) <= 2, out  # host_threads 1 and all cores (the same on a 1-core machine)
    assert all(int(rate) > 0 for _, rate in end_to_end), end_to_end
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"train transform per core: softnce \d+ img/s, timm nan img/s, ratio nan", last), last
