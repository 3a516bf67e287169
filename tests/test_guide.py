"""docs/own_loop.md runs: the ``python`` blocks of each example, executed in order, train and check themselves.

Each ``## Example ...`` section of the guide is one program (its blocks in order, in a fresh
namespace). The code is compiled with the guide's file name and line numbers, so a failure points
at the line of docs/own_loop.md. Besides the examples' own asserts, the tests check what they
compute: the loss went down, and the 8-device loss and gradient equal the 1-device ones.
"""

import os

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(REPO, "docs", "own_loop.md")


def guide_sections(path: str = GUIDE) -> dict[str, str]:
    """``{level-2 heading: its python blocks}``, every other line blank (line numbers are the file's)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    sections: dict[str, list[str]] = {}
    heading, fence = None, None  # fence: the language of the open code block, None outside blocks
    for number, line in enumerate(lines):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = stripped[3:].strip()
            continue
        if fence is not None and stripped == "```":
            fence = None
            continue
        if fence is None and line.startswith("## "):
            heading = line[3:].strip()
        if fence == "python" and heading is not None:
            code = sections.setdefault(heading, [""] * len(lines))
            code[number] = line
    assert fence is None, f"{path}: a code block is not closed"
    return {heading: "\n".join(code) + "\n" for heading, code in sections.items()}


def run_example(prefix: str) -> dict:
    """Executes the section whose heading starts with ``prefix``; returns its namespace."""
    sections = guide_sections()
    matches = [heading for heading in sections if heading.startswith(prefix)]
    assert len(matches) == 1, f"docs/own_loop.md: expected one section {prefix!r} with python blocks, got {matches}"
    namespace = {"__name__": "own_loop_example"}
    exec(compile(sections[matches[0]], GUIDE, "exec"), namespace)  # noqa: S102 - the guide's own code
    return namespace


def test_the_guide_has_its_examples():
    headings = list(guide_sections())
    assert [h.split(":")[0] for h in headings] == ["Example (a)", "Example (b)", "Example (c)", "Example (d)"], headings


def test_one_device_example_trains():
    ns = run_example("Example (a)")
    losses = np.asarray(ns["train_losses"])
    assert len(losses) == 300 and np.all(np.isfinite(losses))
    assert losses[-20:].mean() < losses[:20].mean() - 0.5, (losses[:20].mean(), losses[-20:].mean())
    assert ns["test_nll"] < ns["initial_test_nll"] / 2, (ns["initial_test_nll"], ns["test_nll"])
    assert ns["test_accuracy"] > 0.9


def test_sharded_example_matches_one_device_and_trains():
    ns = run_example("Example (b)")
    assert ns["num_devices"] == jax.device_count() == 8
    # The examples' gradients: 8 devices with pmean inside value_and_grad == one device with the whole batch.
    np.testing.assert_allclose(ns["loss_sharded"], ns["loss_single"], rtol=1e-5)
    for sharded, single, pmap_style in zip(jax.tree.leaves(ns["grads_sharded"]), jax.tree.leaves(ns["grads_single"]),
                                           jax.tree.leaves(ns["grads_pmap_style"])):
        np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(pmap_style, 8 * np.asarray(single), rtol=1e-4, atol=1e-6)
    assert float(np.max(np.abs(np.asarray(jax.tree.leaves(ns["grads_single"])[0])))) > 0
    losses = np.asarray(ns["train_losses"])
    assert len(losses) == 150 and np.all(np.isfinite(losses))
    assert losses[-20:].mean() < losses[:20].mean() - 0.5, (losses[:20].mean(), losses[-20:].mean())
    assert ns["test_accuracy"] > 0.8


def test_padded_batch_and_checks_example():
    ns = run_example("Example (c)")
    real = ns["real"]
    assert ns["padded"] > real and np.asarray(ns["where"]).sum() == real
    np.testing.assert_allclose(ns["masked"][:real], ns["dropped"], rtol=1e-6)
    assert np.all(np.asarray(ns["masked"])[real:] == 0)
    assert np.all(np.asarray(ns["grad"])[real:] == 0) and np.all(np.isfinite(ns["grad"]))
    assert "targets row 3 sums to 0.7, not 1" in ns["step_message"]


def test_nnx_example_trains_and_keeps_batchnorm_statistics():
    ns = run_example("Example (d)")
    losses = np.asarray(ns["train_losses"])
    assert len(losses) == 300 and np.all(np.isfinite(losses))
    assert losses[-20:].mean() < losses[:20].mean() - 0.5, (losses[:20].mean(), losses[-20:].mean())
    assert ns["test_nll"] < ns["initial_test_nll"] / 2 and ns["test_accuracy"] > 0.9
    assert np.abs(ns["running_mean"]).max() > 1e-2  # BatchNorm's running statistics were trained


def test_guide_sections_keep_line_numbers(tmp_path):
    path = tmp_path / "guide.md"
    path.write_text("## A\n```python\nx = 1\n```\n```bash\nls\n```\n"
                    "## B\ntext\n```python\n# ## no heading\ny = 2\n```\n")
    sections = guide_sections(str(path))
    assert list(sections) == ["A", "B"]
    def code_lines(heading):
        return [(number, line) for number, line in enumerate(sections[heading].splitlines()) if line]

    assert code_lines("A") == [(2, "x = 1")]
    assert code_lines("B") == [(10, "# ## no heading"), (11, "y = 2")]
