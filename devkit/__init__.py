"""Development tooling: the ComfyUI test host and random-weight checkpoints.

Not part of the node pack that ComfyUI loads; used by the set-up script, the
tests, the benchmarks and the main-job script.
"""
