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


def test_pareto_front_respects_each_axis_direction():
    from kappatune.reporting import _pareto_front

    pts = [(1.0, 5.0), (2.0, 6.0), (3.0, 4.0)]
    # x lower is better (control ppl change): (3, 4) is beaten by (1, 5); the other two trade off
    assert _pareto_front(pts, x_lower=True) == [(1.0, 5.0), (2.0, 6.0)]
    # x higher is better (BWT): (2, 6) beats (1, 5); (3, 4) is the best on x
    assert _pareto_front(pts, x_lower=False) == [(2.0, 6.0), (3.0, 4.0)]


def test_study_plots_what_it_preregistered():
    from kappatune.reporting import metric_label, pareto_panels

    study = {"study": {"primary_metrics": ["acc", "bwt_acc", "probe_control_ppl_change"]}}
    assert pareto_panels(study) == [("probe_control_ppl_change", "acc"), ("bwt_acc", "acc")]
    # a perplexity bench (no pre-registered accuracy) keeps the perplexity axes
    assert pareto_panels({"seeds": [0]}) == [("control_change_pct", "task_gain_pct")]
    assert metric_label("probe_control_ppl_change") == ("control suite: ppl Δ%", "lower")
    assert metric_label("probe_arc_accuracy_change") == ("control suite arc: accuracy Δ (pts)", "higher")


def test_paired_cell_verdicts_follow_the_statistics():
    from kappatune.reporting import _diff_cell
    from kappatune.stats import paired_difference

    # one pair: a difference but no test, so no verdict at all (not "n.s.", which would claim a test was made)
    one = paired_difference({0: 3.0}, {0: 1.0})
    assert _diff_cell(one) == "2.00 (n=1, no test)"
    # three pairs far from 0: significant on its own, but a primary test is bold only if it survives Holm
    many = paired_difference({0: 3.0, 1: 3.1, 2: 2.9}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert many["significant"] and _diff_cell(many).endswith("**significant**")
    assert _diff_cell({**many, "p_holm": 0.2, "significant_holm": False}).endswith("nominal only")
    assert _diff_cell({**many, "p_holm": 0.01, "significant_holm": True}).endswith("**significant**")


def _bench(xs):
    return {"seeds": [0, 1], "study": {"primary_metrics": ["acc", "probe_control_ppl_change"]},
            "methods": [{"label": f"m{i}", "metrics": {"acc": {"mean": 50.0 + i, "std": 1.0},
                                                       "probe_control_ppl_change": {"mean": x, "std": x / 2}}}
                        for i, x in enumerate(xs)]}


def test_a_diverged_row_puts_the_pareto_axis_on_a_symmetric_log_scale(tmp_path, monkeypatch):
    from kappatune import reporting

    assert reporting.needs_symlog([30.0, 100.0, 150.0, 1.5e7]) and not reporting.needs_symlog([30.0, 100.0, 150.0, 450.0])
    assert not reporting.needs_symlog([1e7, 2.0])  # too few points to call one an outlier
    scales = []

    def keep(fig, path):
        scales.append([ax.get_xscale() for ax in fig.axes])
        return path

    monkeypatch.setattr(reporting, "_save", keep)
    reporting.plot_pareto(_bench([25.0, 120.0, 200.0, 450.0]), tmp_path / "a.png")
    reporting.plot_pareto(_bench([25.0, 120.0, 200.0, 1.5e7]), tmp_path / "b.png")
    assert scales == [["linear"], ["symlog"]]
