"""The DVC remote: opening the repo, push/pull, status, training checkpoints on the remote, Kubernetes pods."""
