"""The model behind `dapo plan` (pipeline/plan.py is the CLI): models.py (parameter counts, GPUs), memory.py (per-GPU
memory by backend and option), throughput.py (decode, training, DAPO's generation demand, weight sync), search.py
(layouts), output.py (tables, configs)."""
