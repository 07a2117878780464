"""One module per op: torch.library custom ops, fake impls, autograd, checks."""
