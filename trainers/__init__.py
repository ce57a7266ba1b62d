"""Bundled LoRA / QLoRA / DoRA runners (trl SFTTrainer + peft + bitsandbytes), with provenance.

    import trainers
    result = trainers.ensure_adapter("trainers/recipes/lora.yml")   # trains only when missing or stale
    result.adapter_dir, result.reused, result.provenance
    trainers.ensure_adapter(recipe, checkpoint_every=30).checkpoints   # also the adapter every 30 steps

Importing this package is cheap: torch, trl, peft, datasets and bitsandbytes load when training.
"""
from evalkit.types import template_hash
from trainers.checkpoints import Checkpoint
from trainers.provenance import PROVENANCE_FILE, read_provenance
from trainers.recipe import Recipe, load_recipe
from trainers.sft import TrainResult, ensure_adapter

__all__ = [
           "PROVENANCE_FILE",
           "Checkpoint",
           "Recipe",
           "TrainResult",
           "ensure_adapter",
           "load_recipe",
           "read_provenance",
           "template_hash",
]
