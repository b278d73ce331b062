"""optserve: an optimizer as a service with torch.optim numbers."""
