"""Parallel strategies. Each wraps the model and the loop from outside; only their *_comm modules call MPI."""
