"""The data path: the sources table, fetching and safe extraction, decoding image files (the one
image reader), the synthetic shapes set, loading processed data, batched on-device augmentation.

Imports only `stages.core`.
"""
