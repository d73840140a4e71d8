"""Reading a trained task-specific-norm model (paper §5): capacity, task relations, filter
specialization, gate distributions and diagnostics, the pruning experiment, and the report."""

from mtnorm.analysis.capacity import capacity_per_layer, capacity_split, importance_vectors
from mtnorm.analysis.gates import diagnose, gate_histogram
from mtnorm.analysis.pruning import close_filters, default_k, pruning_matrix, top_filters
from mtnorm.analysis.relations import clusters, cooccurrence, linkage, relation_stability, task_similarity
from mtnorm.analysis.specialization import normalized_importance, specialization_per_layer, specialized

__all__ = [
    "capacity_per_layer",
    "capacity_split",
    "close_filters",
    "clusters",
    "cooccurrence",
    "default_k",
    "diagnose",
    "gate_histogram",
    "importance_vectors",
    "linkage",
    "normalized_importance",
    "pruning_matrix",
    "relation_stability",
    "specialization_per_layer",
    "specialized",
    "task_similarity",
    "top_filters",
]
