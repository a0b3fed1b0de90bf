"""User tools on top of the pipeline: the `dapo` CLI, report, ablation. Nothing below imports them."""
