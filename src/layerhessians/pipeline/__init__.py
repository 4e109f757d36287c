"""Many runs: grid files and the launchers that execute them (in this process, one job per
GPU, or Slurm)."""
