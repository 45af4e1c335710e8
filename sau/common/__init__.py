"""What every layer shares: the resumable training loop, file helpers, the command-line error path."""
