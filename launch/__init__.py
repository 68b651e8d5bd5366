"""Launchers for real runs: Cloud TPU VMs (`tpu_vm`), multi-host GPU clusters (`multinode`,
`slurm_train.sbatch`) and the capacity table (`capacity`). Run them from the repository root as
`python -m launch.<name> ...`; none of them imports jax at start-up except `capacity`."""
