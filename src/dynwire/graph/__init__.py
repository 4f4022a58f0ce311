"""The dynamic graph: wirings (Sec. 3.1), edge weights (Eq. 4-5), the graph stage (Eq. 3), inference fast path, budget."""
