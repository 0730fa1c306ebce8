"""The tiny real study shared by the study and report tests (run once per session)."""
from __future__ import annotations

import pytest

from ablate.run import main

STUDY = """
name: tiny
data: {name: gaussian_mixture, modes: 2, n: 4000}
design:
  preset: flow_matching
  guidance: none
  time_sampler: {fraction_r_neq_t: 0.25}
  backbone: {name: mlp, width: 32, depth: 1}
train: {steps: 40, batch_size: 64, log_every: 10, ckpt_every: 20, grad_clip: 0.0}
eval: {every: 20, nfe: [1, 2], num_samples: 200}
sample: {nfe: [1], num: 100}
search:
  grid:
    design.target: [flow_matching, meanflow]
    train.lr: [0.001, 1.0e+30]
  seeds: 1
  max_failures: 0
resources: {cpus_per_trial: 1}
"""


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    path = root / "tiny.yaml"
    path.write_text(STUDY)
    argv = [str(path), f"tracking.uri=sqlite:///{root}/mlflow.db", f"resources.storage={root}/ray"]
    rc = main(argv)
    return root, argv, rc


