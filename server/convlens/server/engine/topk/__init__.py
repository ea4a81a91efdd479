"""TopActivations' engine side: the per-channel top-k index (index.py), its file format (file_format.py),
candidate extraction from a batch of activations (candidates.py), and the scan that forwards a batch to a
layer (scan.py). Pure torch/numpy; indexing/ builds, stores and shares indexes on top of it.
"""
