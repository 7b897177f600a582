"""Text, live masks, the plan evaluator, metrics, cost and benchmarks."""
