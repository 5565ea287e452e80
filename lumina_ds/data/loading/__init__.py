"""From documents to batches: the weighted mixture, the global resumable row order, packing and the loader."""
