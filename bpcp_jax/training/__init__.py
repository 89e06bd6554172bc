"""Training: CIFAR data and augmentation, optimizers, pure train/eval steps, the pmap wrappers, the epoch loop and orbax stage checkpoints."""
