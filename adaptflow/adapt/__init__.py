"""Domain adaptation in pure PyTorch: shared losses, algorithms behind one contract, their
hyperparameters, a flat training loop, label-free validators and domain-gap measures."""
