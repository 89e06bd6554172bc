"""The run layer: configs, the stage pipeline, reports, sweeps, the ``bpcp-jax`` command line, and the host set-up it restarts with."""
