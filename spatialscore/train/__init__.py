"""Training algorithms for reward models: one file per method, the shared maths in `losses.py`."""
