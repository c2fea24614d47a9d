"""Micro-benchmarks and floors: what one kernel, block or step costs, and how far it can go."""
