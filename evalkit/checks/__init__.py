"""Checks that catch silent failures no score shows, one family per module:

- `models`: is each model what it claims (an adapter that changes nothing, a server that serves
  another model than the in-process reference);
- `merge`: a merged variant against its unmerged twin (the lossy merge);
- `training`: what an adapter's training recorded against this evaluation (leakage, an
  unhealthy training run, training prompts unlike the eval's: `evalkit.pitfalls`);
- `stopping`: an adapter that no longer stops where its reference does;
- `common`: what they share (gate options, skipped records, probe prompts, comparisons).

Each returns `CheckRecord`s (name, variant, passed, message, details); gates with `check:` read
them, and a hard failure (an adapter that changes nothing) raises before any scoring.
"""
