"""The pure core: functions over pytrees of tensors (trees, keys, layers, losses, optimizers, schedules,
per-example gradients, augmentation, loss scaling). Nothing here reads files, prints or holds state."""
