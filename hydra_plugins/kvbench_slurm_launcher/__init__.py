"""kvbench's Slurm launcher, where Hydra looks for launchers (`hydra/launcher=submitit_slurm`); its behaviour is in
bench/scaleout/slurm.py. Hydra imports this at every start: without the launchers extra (submitit) there is nothing to
register, and bench.run refuses `hydra/launcher=submitit_slurm` in one line."""

try:
    import bench.scaleout.slurm as _slurm
except ImportError:
    _slurm = None

if _slurm is not None:

    class SlurmLauncher(_slurm.SlurmLauncher):
        """Registered under this module's name, as Hydra requires of a launcher."""
