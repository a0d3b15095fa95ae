"""The DAG's steps: one module per step, each exposing `step(cfg, inputs...) -> dict` named after it.

Steps stand on the libraries in `tasks/` and never import each other.
"""
