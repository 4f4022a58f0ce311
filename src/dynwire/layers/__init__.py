"""Layers of a DG-Net node: the router and edge gate (Eq. 4-5) and the weighted aggregation (Eq. 3, 8-10)."""
