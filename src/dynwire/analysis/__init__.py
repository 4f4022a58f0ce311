"""Analysis of trained models: connectivity (App. 6.5, Figs. 5-7), profiles (params, MACs), statistics and plots."""
