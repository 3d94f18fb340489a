"""Teacher loading, student construction, objectives, the DeepSpeed engine, checkpoints
and export of task-agnostic distillation."""
