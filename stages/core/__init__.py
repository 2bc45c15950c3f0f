"""Infrastructure every stage shares: paths, errors (validation errors as one line), atomic files,
checkpoints, MLflow tracking.

Imports nothing from the rest of `stages` (only `nets`), so anything may import it.
"""
