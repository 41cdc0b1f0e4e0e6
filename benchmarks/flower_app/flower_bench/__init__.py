"""fedmeki's round benchmark as a Flower App (benchmarks/vs_flower.py runs it)."""
