"""One module per op: its torch.library custom ops (fastattn::<op>_fwd / _bwd) with
fake and autograd registrations, its per-backend dispatch, and its public function.

The public functions are re-exported by fastattn itself, not here, so that each name
below stays the module of the same name (fastattn.ops.attention is the module).
"""
