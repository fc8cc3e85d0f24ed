"""Networks of cells and training: layers, heads, optimisers, tasks, the training loop, sequence-to-sequence models and sampling."""
