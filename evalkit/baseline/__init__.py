"""Promoted baselines: what is in production, paired case by case without recomputing it.

`evalkit promote RUN --variant NAME` writes that variant of a finished run into a store as an
immutable bundle (`evalkit.baseline.store`); a later run with `baseline: STORE` (or `--baseline
STORE`) reads it back as a read-only variant whose per-case scores pair with the live variants'
through the same statistics as any other pair (`evalkit.baseline.pairing`). What the scores depend
on (the base, each task's settings, each case's prompt as sent and its target) must match the
bundle's, or the run stops listing what differs (exit 4), unless the suite says
`baseline_mismatch: intersect`.
"""
