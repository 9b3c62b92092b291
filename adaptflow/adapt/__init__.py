"""Domain adaptation on PyTorch: shared losses, algorithms behind one contract, their hyperparameters,
a flat training loop with checkpoints, label-free validators, model selection and domain-gap measures.
Validators and the gap measures also use scikit-learn; selection's confidence test uses SciPy."""
