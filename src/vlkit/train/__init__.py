"""The training loop, checkpoints and what a resumed run needs to continue exactly."""
