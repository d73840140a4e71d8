"""Reading a trained task-specific-norm model: capacity, and (later) relations, specialization."""

from mtnorm.analysis.capacity import capacity_split, importance_vectors

__all__ = ["capacity_split", "importance_vectors"]
