"""Bootstrap intervals: every weighted statistic equals its plain metric on the examples and
on any explicit resample of them; intervals are seeded, have the textbook width, and paired
intervals see a real change and no change."""

import numpy as np
import pytest

from peftdebias_jax.data import synthetic, tasks
from peftdebias_jax.evaluation import bootstrap, extrinsic, intrinsic, scoring

WORDS = ["muslim", "black", "white", "christian", "asian"]


def hate_sample(seed: int, n: int = 120):
    rng = np.random.default_rng(seed)
    texts = [f"{WORDS[rng.integers(5)]} people said {'x' * int(rng.integers(3))}" for _ in range(n)]
    gold = rng.integers(0, 2, n).tolist()
    pred = [int(g if rng.random() < 0.7 else 1 - g) for g in gold]
    return gold, pred, texts


def bios_sample(seed: int, n: int = 120):
    rng = np.random.default_rng(seed)
    jobs = ["nurse", "surgeon", "teacher", "pilot"]
    gold = [jobs[i] for i in rng.integers(0, 4, n)]
    pred = [g if rng.random() < 0.6 else jobs[rng.integers(4)] for g in gold]
    groups = ["m" if rng.random() < 0.5 else "f" for _ in range(n)]
    return gold, pred, groups


def pairs_of_metric_and_statistic(seed: int):
    """(plain metric on index list, statistic) for every metric that gets an interval."""
    gold, pred, texts = hate_sample(seed)
    bgold, bpred, bgroups = bios_sample(seed)
    groups = [t.split()[0] in ("muslim", "black") for t in texts]

    def on(idx, f, *arrays):
        return f(*([a[i] for i in idx] for a in arrays))

    cases = [
        (lambda i: on(i, extrinsic.accuracy, gold, pred), extrinsic.accuracy_statistic(gold, pred)),
        (lambda i: on(i, extrinsic.macro_f1, bgold, bpred),
         extrinsic.macro_f1_statistic(bgold, bpred)),
        (lambda i: on(i, lambda *a: extrinsic.tpr_gap(*a).rms, bgold, bpred, bgroups),
         extrinsic.tpr_gap_statistic(bgold, bpred, bgroups)),
        (lambda i: on(i, extrinsic.demographic_parity_difference, pred, groups),
         extrinsic.demographic_parity_statistic(pred, groups)),
        (lambda i: on(i, extrinsic.equalized_odds_difference, gold, pred, groups),
         extrinsic.equalized_odds_statistic(gold, pred, groups)),
        (lambda i: on(i, extrinsic.fraction_neutral, [("neutral", "x")[p] for p in pred]),
         extrinsic.fraction_neutral_statistic([("neutral", "x")[p] for p in pred])),
    ]  # fmt: skip
    for variant in ("reference", "dixon"):
        cases.append((
            lambda i, v=variant: on(i, lambda *a: extrinsic.fprd(*a, variant=v).value,
                                    gold, pred, texts),
            extrinsic.fprd_statistic(gold, pred, texts, variant=variant),
        ))  # fmt: skip
    return len(gold), cases


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_statistics_equal_their_metric_on_the_sample_and_on_explicit_resamples(seed):
    n, cases = pairs_of_metric_and_statistic(seed)
    rng = np.random.default_rng(100 + seed)
    draws = [np.arange(n)] + [rng.integers(0, n, n) for _ in range(5)]
    weights = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(float)
    for metric, statistic in cases:
        values = statistic(weights)
        for d, value in zip(draws, values, strict=True):
            assert value == pytest.approx(metric(list(d)), abs=1e-9)


def test_interval_is_seeded_and_has_the_textbook_width():
    rng = np.random.default_rng(0)
    n, p = 2000, 0.7
    correct = rng.random(n) < p
    gold, pred = [1] * n, [int(c) for c in correct]
    stat = extrinsic.accuracy_statistic(gold, pred)
    settings = bootstrap.Settings(resamples=2000, seed=3)
    low, high = bootstrap.interval(stat, n, settings)
    observed = correct.mean()
    assert low < observed < high
    half_width = 1.96 * np.sqrt(observed * (1 - observed) / n)  # normal approximation
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    assert bootstrap.interval(stat, n, settings) == (low, high)
    assert bootstrap.interval(stat, n, bootstrap.Settings(2000, seed=4)) != (low, high)


def test_blocks_do_not_change_the_resamples(monkeypatch):
    stat = extrinsic.accuracy_statistic(*hate_sample(5)[:2])
    whole = bootstrap.replicates(stat, 120, bootstrap.Settings(250, seed=1))
    assert len(whole) == 250 and np.isfinite(whole).all()
    counts = np.concatenate(list(bootstrap.resample_counts(120, 250, 1)))
    assert counts.shape == (250, 120) and (counts.sum(1) == 120).all()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="resamples"):
        bootstrap.Settings(resamples=2)
    with pytest.raises(ValueError, match="level"):
        bootstrap.Settings(level=1.5)


def test_interval_is_none_when_mostly_undefined():
    values = np.array([np.nan] * 90 + [1.0] * 10)
    assert bootstrap.percentile_interval(values) is None


def test_paired_interval_sees_a_change_and_no_change():
    task = tasks.get("ghc")
    examples = synthetic.labelled("ghc", 600, seed=1)
    labels = ["0", "1"]
    gold = [e.label for e in examples]
    rng = np.random.default_rng(0)
    # FT flags every non-hateful targeted sentence; the "patched" run flags none of them
    ft = [("1" if e.group == "targeted" else g) if rng.random() < 0.9 else g
          for e, g in zip(examples, gold, strict=True)]  # fmt: skip
    patched = list(gold)
    change = scoring.paired_intervals(task, labels, examples, [patched], [ft])
    assert change["fprd_dixon"]["difference"] < 0 and change["fprd_dixon"]["interval"][1] < 0
    same = scoring.paired_intervals(task, labels, examples, [ft, ft], [ft])
    assert same["fprd_reference"]["difference"] == 0 and same["fprd_reference"]["interval"] == (
        0.0,
        0.0,
    )
    assert {"accuracy", "macro_f1", "demographic_parity", "equalized_odds"} <= set(change)


def test_score_split_reports_an_interval_around_every_number():
    task = tasks.get("bias_bios")
    examples = synthetic.labelled("bias_bios", 300, seed=2)
    labels = sorted({e.label for e in examples})
    rng = np.random.default_rng(1)
    predicted = np.array([labels.index(e.label) if rng.random() < 0.8 else 0 for e in examples])
    scores = scoring.score_split(task, labels, examples, predicted,
                                 settings=bootstrap.Settings(500))  # fmt: skip
    assert set(scores["intervals"]) == {"accuracy", "macro_f1", "tpr_gap"}
    for name, (low, high) in scores["intervals"].items():
        assert low <= scores[name] <= high, name
    assert scores["bootstrap"] == {"resamples": 500, "level": 0.95, "seed": 0}
    assert "intervals" not in scoring.score_split(task, labels, examples, predicted)


def test_a_split_too_small_for_tpr_gap_keeps_its_other_scores():
    """No class with bios of both genders (a small validation set): TPR-GAP is recorded as
    undefined, with why, and accuracy and its interval still stand."""
    task = tasks.get("bias_bios")
    examples = [e for e in synthetic.labelled("bias_bios", 300, seed=2) if e.group == "m"][:12]
    labels = sorted({e.label for e in examples})
    predicted = np.array([labels.index(e.label) for e in examples])
    scores = scoring.score_split(task, labels, examples, predicted, settings=bootstrap.Settings(50))
    assert "tpr_gap" not in scores and "both groups" in scores["tpr_gap_error"]
    assert scores["accuracy"] == 100.0 and set(scores["intervals"]) == {"accuracy", "macro_f1"}
    with pytest.raises(ValueError, match="both groups"):
        extrinsic.tpr_gap_statistic(["a", "b"], ["a", "a"], ["m", "f"])


def explicit_resamples(n: int, seed: int, count: int = 4):
    rng = np.random.default_rng(seed)
    draws = [np.arange(n)] + [rng.integers(0, n, n) for _ in range(count)]
    return draws, np.stack([np.bincount(d, minlength=n) for d in draws]).astype(float)


def test_intrinsic_statistics_equal_their_scores_on_explicit_resamples():
    rng = np.random.default_rng(0)
    # CrowS-Pairs: the share of pairs preferring the more stereotyping sentence
    pairs = [{"preferred": ("sent_more", "sent_less", "neutral")[rng.integers(3)]}
             for _ in range(50)]  # fmt: skip
    draws, w = explicit_resamples(50, 1)
    values = intrinsic.crows_statistic(pairs)(w)
    for d, v in zip(draws, values, strict=True):
        chosen = [pairs[i] for i in d]
        assert v == pytest.approx(100 * sum(p["preferred"] == "sent_more" for p in chosen) / 50)
    # StereoSet: per-target shares averaged over targets, per domain
    items = [intrinsic.StereoItem(str(i), f"t{i % 7}", ("race", "gender")[i % 2], "BLANK", {})
             for i in range(60)]  # fmt: skip
    scores = [{k: float(rng.random()) for k in intrinsic.LABELS} for _ in items]
    draws, w = explicit_resamples(60, 2)
    for domain in ("race", "overall"):
        for key in ("ss", "lms"):
            values = intrinsic.stereoset_statistic(items, scores, domain, key)(w)
            for d, v in zip(draws, values, strict=True):
                expected = intrinsic.stereoset_scores([items[i] for i in d], [scores[i] for i in d])
                assert v == pytest.approx(expected[domain][key]), (domain, key)

    # SEAT: d with the attribute sets fixed, the target sentences resampled
    def unit(rows):
        v = rng.normal(size=(rows, 6))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    x, y, a, b = unit(9), unit(8), unit(5), unit(5)
    draws, w = explicit_resamples(17, 3)
    values = intrinsic.effect_size_statistic(x, y, a, b)(w)
    both = np.concatenate([x, y])
    for d, v in zip(draws, values, strict=True):
        xs, ys = both[[i for i in d if i < 9]], both[[i for i in d if i >= 9]]
        assert v == pytest.approx(intrinsic.effect_size(xs, ys, a, b))


def test_seat_mean_abs_interval_combines_independent_tests():
    tests = [{"effect_size": 0.5, "replicates": np.linspace(0.3, 0.7, 101)},
             {"effect_size": -0.2, "replicates": np.linspace(0.0, -0.4, 101)}]  # fmt: skip
    summary = intrinsic.mean_abs_effect(tests, 0.95)
    assert summary["value"] == pytest.approx(0.35)
    low, high = summary["interval"]
    assert low < 0.35 < high and all("replicates" not in t for t in tests)
