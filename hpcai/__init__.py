"""hpcai: MPI-driven batch jobs for training AI models on supercomputers."""

__version__ = "0.1.0"
