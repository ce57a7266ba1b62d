"""Suite configuration: YAML -> typed, validated Suite."""
from evalkit.config.loader import load_suite, read_yaml
from evalkit.config.suite import Gate, GenerateTask, GenerationConfig, JudgeTask, MmluTask, ScorerSpec, Suite, Task, Variant

__all__ = ["Gate", "GenerateTask", "GenerationConfig", "JudgeTask", "MmluTask", "ScorerSpec", "Suite", "Task",
           "Variant", "load_suite", "read_yaml"]
