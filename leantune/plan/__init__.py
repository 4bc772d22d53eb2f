"""Memory planner: predict a run's peak memory from the model config and the recipe,
without loading weights, and search for settings that fit a budget.

    leantune plan RECIPE.yaml                   # predicted peak, broken down by term
    leantune plan RECIPE.yaml --memory 2GB      # settings that fit, cheapest first; writes a recipe

``model_shape`` reads the model's config (or GGUF header) and takes its parameter inventory on the
meta device; ``memory`` holds one pure function per memory term and ``plan_memory``; ``search``
holds the budget search and its cost model.
"""

from leantune.plan.memory import CALIBRATION, Calibration, MemoryPlan, plan_memory
from leantune.plan.model_shape import ModelShape, PlanError, model_shape

__all__ = ["CALIBRATION", "Calibration", "MemoryPlan", "ModelShape", "PlanError", "model_shape", "plan_memory"]
