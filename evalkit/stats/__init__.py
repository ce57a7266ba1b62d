"""Confidence bounds and paired comparisons for per-case scores (pure numpy, deterministic).

One module per job: `intervals` (one mean: exact and bootstrap-t bounds, and the helpers they share),
`paired` (a candidate against a reference on the same cases: Tango, McNemar, bootstrap-t, Holm),
`two_sample` (two unpaired samples: Kolmogorov-Smirnov) and `power` (planning: the power and sample
size of the `max_drop` gate).

Conventions:
- A score of None or NaN is invalid. Intervals use the valid values; `n` counts them.
- Binary (0/1) metrics: exact (Clopper-Pearson) bounds for a proportion; Tango's score test and interval for
  the difference of paired proportions (closed form in n, lost, gained: no resampling). The
  interval, the p-value and every non-inferiority bound come from the same score statistic, so
  they never contradict one another. Exact McNemar is kept beside it as the classic "any change" p.
- Graded metrics: a studentized (bootstrap-t) bootstrap, which holds its level much better than
  the percentile bootstrap when the differences are skewed; when fewer than `FEW_NONZERO`
  differences are nonzero, the bound is floored by the score bound on the summed losses and
  gains, since no bootstrap can learn a tail from a handful of values.
- Resampling is seeded from the content (the sorted values), so a verdict never depends on the
  order of the cases or on anything else outside the data.
- Every bound is one-sided at a stated level: "the drop is below U with 95% confidence" is
  `upper_drop(0.95)`. A two-sided interval at confidence c is the pair of one-sided bounds at
  (1 + c) / 2.
"""
