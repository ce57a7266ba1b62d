"""Suite configuration: YAML + JSON Schema -> typed Suite."""
from evalkit.config.loader import load_suite, read_yaml
from evalkit.config.suite import Gate, GenerationConfig, ScorerSpec, Suite, Task, Variant

__all__ = ["Gate", "GenerationConfig", "ScorerSpec", "Suite", "Task", "Variant", "load_suite", "read_yaml"]
