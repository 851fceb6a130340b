"""Stage 2, augmentation: the hidden-state decoder, its training, candidate generation and filters, and
the review log."""
