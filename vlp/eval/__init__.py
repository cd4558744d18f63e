"""Evaluation: retrieval metrics (Recall@K), the ITC + ITM re-ranking evaluator, reports and checkpoint loading."""

from vlp.eval.config import RetrievalConfig
from vlp.eval.metrics import METRIC_KEYS, TopK, metrics_from_ranks, ranks, recall_at_k
from vlp.eval.retrieval import RetrievalEvaluator, RetrievalResult, evaluate_retrieval, run_retrieval

__all__ = [
    "METRIC_KEYS",
    "RetrievalConfig",
    "RetrievalEvaluator",
    "RetrievalResult",
    "TopK",
    "evaluate_retrieval",
    "metrics_from_ranks",
    "ranks",
    "recall_at_k",
    "run_retrieval",
]
