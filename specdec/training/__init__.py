"""Self-distillation training of draft heads (Medusa, Hydra, Clover) for a target model: ``specdec train``.

``train_heads(target, tokenizer, output, recipe)`` runs the pipeline (``pipeline.py``); ``TrainRecipe`` and its
presets ``cpu`` / ``gpu`` say what it does (``recipe.py``); docs/training.md describes the data and the stages.
"""

from specdec.training.pipeline import train_heads
from specdec.training.recipe import PRESETS, TrainRecipe, preset

__all__ = ["PRESETS", "TrainRecipe", "preset", "train_heads"]
