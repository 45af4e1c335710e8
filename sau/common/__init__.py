"""What every layer shares: the resumable training loop, file helpers and the demo folder, strict state-dict
loading, the command-line error path."""
