"""Distillation of a draft model from the served model: losses, teacher data through the engine, students,
the trainer (``fastinfer distill``). Imports torch: the CLI imports this package lazily."""
