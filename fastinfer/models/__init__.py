"""Native model architectures and the checkpoint loaders."""
