"""Turns one recipe plus one cluster profile into a running job (local, multi-node
torchrun, a DeepSpeed hostfile, Slurm, Ray). The launcher passes the recipe path and the
overrides through; it never re-declares training settings."""
