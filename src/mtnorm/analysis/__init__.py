"""Reading a trained task-specific-norm model (paper §5): capacity, task relations, filter
specialization, gate distributions and diagnostics, the pruning experiment, measured task affinity
(TAG lookahead, ATI), task representations in 2-D, and the report."""

from mtnorm.analysis.affinity import (
    affinity_agreement,
    average_task_interference,
    lookahead_affinity,
    task_interference,
)
from mtnorm.analysis.capacity import capacity_per_layer, capacity_split, importance_vectors
from mtnorm.analysis.gates import diagnose, gate_histogram
from mtnorm.analysis.pruning import close_filters, default_k, pruning_matrix, top_filters
from mtnorm.analysis.relations import clusters, cooccurrence, linkage, relation_stability, task_similarity
from mtnorm.analysis.representation import pca_2d, representation_embedding, task_representations
from mtnorm.analysis.specialization import normalized_importance, specialization_per_layer, specialized

__all__ = [
    "affinity_agreement",
    "average_task_interference",
    "lookahead_affinity",
    "pca_2d",
    "representation_embedding",
    "task_interference",
    "task_representations",
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
