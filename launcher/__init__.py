"""Launchers: one machine (DeepSpeed launcher / mpiexec), several nodes with DeepSpeed, SLURM batch jobs."""
