"""Triton kernels of fastattn, installed as fastattn.kernels.

One module per op (attention.py, layer_norm.py, ffn.py, decode.py) and _config.py for
the autotune spaces. Modules here import triton; fastattn imports them lazily, only
when the triton backend runs.
"""
