"""Building, storing and sharing per-unit top-k indexes (model x dataset x layer)."""
