"""reporting: the bench report and plots accept every section a bench can hold together."""

from kappatune.reporting import plot_learning_curves


def test_learning_curve_plot_with_paired_differences_and_a_target(tmp_path):
    # A bench with learning curves, an equal-quality target *and* paired differences: the plot once contained
    # the paired-table code by mistake and raised NameError on exactly this combination.
    bench = {
        "seeds": [0, 1],
        "curves": {"stage": 1, "methods": {"a": [{"step": 0, "task_ppl": 9.0, "control_ppl": 5.0},
                                                 {"step": 5, "task_ppl": 7.0, "control_ppl": 5.5}]}},
        "equal_quality": {"mean_target_task_ppl": 8.0, "reference": "a"},
        "paired": {"baseline": "a", "methods": {"b": {"acc": {"mean": 1.0, "ci": [0.5, 1.5], "n": 2,
                                                              "significant": True}}}},
    }
    out = plot_learning_curves(bench, tmp_path / "curves.png")
    assert out.exists() and out.stat().st_size > 1000
