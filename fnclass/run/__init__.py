"""The run's files: the run directory, checkpoints, exports, the model zoo and the loggers."""
